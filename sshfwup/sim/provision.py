"""Making a new simulated device the way a factory would: a blank (sparse) disk image and the
U-Boot env's place in it, fwup's ``complete`` task, an empty data filesystem holding sshfwup's
authorized keys, its SSH host key and the record of the firmware it flashed.

The host key is the same every time a device is made in the same directory (by the same user on
the same machine): derived from the directory's path and a random secret kept once per user
(:data:`HOST_KEY_SECRET`), so ``sim destroy DIR`` then ``sim create DIR`` leaves ``ssh``'s
known_hosts entry valid. A device's key still differs from every other directory's and machine's."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sshfwup.boot.backends import DEFAULT_CONTRACT
from sshfwup.boot.bootenv import BootEnv, BootEnvError
from sshfwup.firmware.errors import FirmwareError
from sshfwup.sim.appuser import check_app_interpreter
from sshfwup.sim.blockdev import run_tool
from sshfwup.sim.bootloader import FACTORY_ENV
from sshfwup.sim.device_parts import DeviceParts
from sshfwup.sim.errors import ProvisionError, SimError
from sshfwup.sim.firmware import find_fwup
from sshfwup.sim.layout import DEFAULT_LAYOUT, Layout
from sshfwup.sim.layouts import OPS_ARCHIVE, build_ops_archive, layout_of_firmware, ops_overrides
from sshfwup.system.fsutil import write_atomically
from sshfwup.update.fwhead import MAX_HEAD, read_head_bytes
from sshfwup.update.installed import record


log = logging.getLogger(__name__)

__all__ = ["HOST_KEY_SECRET", "create_device", "stable_host_key"]

#: The per-user secret the simulated devices' host keys are derived from (made on first use, 0600).
HOST_KEY_SECRET = "sshfwup/sim-host-key-secret"  # under $XDG_STATE_HOME, else ~/.local/state

Device = TypeVar("Device", bound=DeviceParts)


def create_device(
    cls: Callable[..., Device],
    path: Path,
    *,
    firmware: Path,
    layout: Layout | None,
    fwup: str | None,
    authorized_keys: Sequence[str],
    ssh_port: int,
    app_port: int,
    config_overrides: Mapping[str, Any] | None,
    ops_conf: Path | None = None,
) -> Device:
    """A new device of class ``cls`` at ``path`` (see ``SimDevice.create``). ``layout`` None: the
    disk the firmware's own fwup.conf describes (sim/layouts.py), or the default one."""
    path = Path(path).resolve()
    firmware = Path(firmware).resolve()
    if not firmware.is_file():
        raise ProvisionError(f"firmware file {firmware} not found")
    if layout is None:
        layout = _layout_of(firmware)
    device = cls(path, layout=layout, fwup="", ssh_port=ssh_port, app_port=app_port)
    if device.disk.exists() or device.device_json.exists():
        raise SimError(f"{path} already holds a simulated device (destroy it first)")
    overrides = dict(config_overrides or {})
    # Before anything is made: a device whose app cannot start fails only in its machine log.
    check_app_interpreter(overrides)
    factory_env = _factory_env_of(overrides)
    try:
        fwup = find_fwup(fwup)
    except FirmwareError as e:
        raise ProvisionError(str(e)) from None
    for sub in ("", "data"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    if _contract_of(overrides) == "fwup-ops":
        overrides = _with_ops(overrides, path, device.disk, fwup, ops_conf)
    elif ops_conf is not None:
        raise ProvisionError(f"an ops archive ({ops_conf}) is for the fwup-ops contract; this device's is "
                             f"{_contract_of(overrides)}")  # fmt: skip
    device = cls(
        path,
        layout=layout,
        fwup=fwup,
        ssh_port=ssh_port,
        app_port=app_port,
        config_overrides=overrides or None,
    )
    with open(device.disk, "wb") as f:
        f.truncate(layout.disk_bytes)  # sparse
    env_offset, env_size = layout.uboot_env_span
    write_atomically(device.fw_env_config, f"{device.disk} 0x{env_offset:x} 0x{env_size:x}\n")
    device.save()
    _flash(device, firmware, authorized_keys)
    if factory_env:
        try:
            BootEnv(device.fw_env_config).write_sync(factory_env)
        except BootEnvError as e:
            raise ProvisionError(f"cannot write the factory boot environment: {e}") from None
    device.write_config()
    device.prepare_app_user()
    log.info("created simulated device %s from %s", path, firmware.name)
    return device


def _contract_of(overrides: Mapping[str, Any]) -> str:
    boot = overrides.get("boot")
    return str(boot.get("contract", DEFAULT_CONTRACT)) if isinstance(boot, dict) else DEFAULT_CONTRACT


def _layout_of(firmware: Path) -> Layout:
    """The disk the firmware's fwup.conf writes; the default disk for a firmware that does not say."""
    try:
        return layout_of_firmware(firmware)
    except ProvisionError as e:
        log.debug("%s; using the default disk layout", e)
        return DEFAULT_LAYOUT


def _with_ops(overrides: dict[str, Any], path: Path, disk: Path, fwup: str, ops_conf: Path | None) -> dict[str, Any]:
    """A fwup-ops device's ``[boot]``: the ops archive (built from ``ops_conf``, or the one the
    overrides name), its disk, the reboot parameter in the device directory."""
    boot = dict(overrides.get("boot") or {})
    if ops_conf is not None:
        boot["ops_archive"] = str(build_ops_archive(fwup, Path(ops_conf), path / OPS_ARCHIVE))
    archive = boot.get("ops_archive")
    if not archive or not Path(archive).is_file():
        raise ProvisionError(
            "the fwup-ops contract needs the system's ops archive: give --ops-conf FILE or --layout with an "
            "ops.conf" + (f" ({archive} does not exist)" if archive else "")
        )
    return {**overrides, "boot": ops_overrides(path, disk, boot)}


def _factory_env_of(overrides: Mapping[str, Any]) -> dict[str, str]:
    """What the system's U-Boot environment carries from the factory beside fwup's ``complete``,
    for the boot contract the configuration names."""
    contract = _contract_of(overrides)
    if contract not in FACTORY_ENV:
        raise ProvisionError(f"boot contract {contract!r}: the simulator has a bootloader for {', '.join(FACTORY_ENV)}")
    return dict(FACTORY_ENV[contract])


def _flash(device: DeviceParts, firmware: Path, authorized_keys: Sequence[str]) -> None:
    """fwup's ``complete`` task onto the blank disk, then a fresh data filesystem."""
    argv = [device.fwup, "-a", "-d", str(device.disk), "-i", str(firmware), "-t", "complete"]
    proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        raise ProvisionError(f"fwup -t complete failed (exit status {proc.returncode}): {output}")
    try:
        device.attach()
        app_loop = device.loops()["app"].name
        try:
            run_tool(["mkfs.ext4", "-q", "-F", "-L", "appdata", app_loop], what="formatting the app data partition")
        except SimError as e:
            raise ProvisionError(str(e)) from None
        device.mount_data()
        head = read_head_bytes(firmware.read_bytes()[:MAX_HEAD], final=True)
        if head is not None:  # as a factory would: the resources of what it flashed
            record(device.server_data_dir, "a", head.uuid, head.version, head.resources)
        keys = device.server_data_dir / "authorized_keys"
        write_atomically(keys, "".join(line.rstrip("\n") + "\n" for line in authorized_keys), mode=0o600)
        _write_host_key(device.server_data_dir / "ssh_host_ed25519_key", device.path)
    finally:
        device.unmount_all()
        device.detach()


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base)


def _host_key_secret() -> bytes:
    """This user's secret for the simulated devices' host keys (made once, 32 random bytes)."""
    path = _state_dir() / HOST_KEY_SECRET
    try:
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_bytes(32)
    try:
        with open(path, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
            f.write(secret)
    except FileExistsError:  # another create won the race (or the file was short): use what is there
        existing = path.read_bytes()
        if len(existing) >= 32:
            return existing
        write_atomically(path, secret, mode=0o600)
    return secret


def stable_host_key(directory: Path) -> bytes:
    """The OpenSSH private key (ed25519) of a simulated device in ``directory``: the same for
    the same (resolved) directory and user secret."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = hmac.new(_host_key_secret(), str(Path(directory).resolve()).encode(), hashlib.sha256).digest()
    return Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _write_host_key(path: Path, directory: Path) -> None:
    """The device's host key where its server looks (it would make a random one on first start);
    a random one, said, when this user's secret cannot be kept."""
    import asyncssh

    try:
        key = asyncssh.import_private_key(stable_host_key(directory))
    except OSError as e:
        log.warning("cannot keep the secret for stable simulated host keys (%s): %s gets a new host key", e, directory)
        return
    write_atomically(path, key.export_private_key(), mode=0o600)
    write_atomically(Path(f"{path}.pub"), key.export_public_key(), mode=0o644)
    log.info("host key of %s: %s (the same each time a device is made there)", directory, key.get_fingerprint())
