"""One simulated A/B device in a directory: disk image, loop devices, mounts, server config.

The directory ``D`` holds everything (see docs/ARCHITECTURE.md), except the mount points the
app runs from, which live in the runtime directory ``R = /run/sshfwup-sim/D`` (the app runs as
its own unprivileged user and must reach them; ``D`` may sit below a private directory)::

    D/disk.img        the whole disk: MBR, U-Boot env, rootfs a, rootfs b, app data
    D/fw_env.config   where the U-Boot env sits inside disk.img, for fw_printenv/fw_setenv
    D/device.json     how this device was made (layout, ports, fwup, config overrides)
    R/root/           the running root: the booted slot, mounted read-only
    D/data/           the app data partition (ext4), holds sshfwup's data dir
    R/run/            the server's run dir (lock, the pipeline's slot mounts)
    D/sshfwup.toml    the server's configuration
    D/machine.json    the simulated machine's state (written by machine.py)
    D/ops.fw          fwup-ops devices: the system's ops archive (sim/layouts.py builds it)
    D/reboot-param    fwup-ops devices: fwup's reboot_param() ("0 tryboot"); a restart uses it up
    R/owner.json      who owns the device (pid + start time; see OWNER_ENV and sim/stale.py)

This kernel sandbox creates no partition nodes (loopNpM), so each partition is its own loop
device over ``disk.img`` with an offset and a size limit. fwup writes ``disk.img`` itself, not
the loop devices, and a loop block device keeps its own page cache: every mount of a slot
flushes that device's buffers first, or it would show the slot as it was before the update.

``SimDevice`` powers the disk and mounts it; the rest lives in the module named for its job, and
the names below stay importable from here:

- :mod:`.blockdev`: loop devices and mounts on this machine (``loop_devices``, ``mounts``);
- :mod:`.machine_procs`: a machine's processes, by its marker and its lock;
- :mod:`.owner`: the runtime directory and who owns the device (``claim``, ``owner_of``);
- :mod:`.teardown`: ``cleanup``, whatever state the device was left in;
- :mod:`.appuser`: the app's user and the host Python it runs on;
- :mod:`.provision`: a new device, made as a factory would (``SimDevice.create``);
- :mod:`.server_config`: ``D/sshfwup.toml``;
- :mod:`.slot_peek`: a slot's file or bytes, for tests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sshfwup.boot.backends import DEFAULT_CONTRACT
from sshfwup.boot.bootenv import BootEnv
from sshfwup.boot.slots import MountInfo, mounts
from sshfwup.sim import slot_peek
from sshfwup.sim.appuser import app_interpreter, ensure_app_user
from sshfwup.sim.blockdev import LoopDevice, loop_devices, run_tool, unmount_under
from sshfwup.sim.errors import ProvisionError, SimError
from sshfwup.sim.layout import ROLES, SLOTS, Layout
from sshfwup.sim.machine_procs import (
    MACHINE_LOCK,
    MARKER_ENV,
    kill_marked_processes,
    lock_holders,
    machine_pids,
    marked_processes,
)
from sshfwup.sim.owner import OWNER_ENV, OWNER_FILE, RUNTIME_BASE, claim, current_owner, make_public_dir, owner_of, runtime_dir
from sshfwup.sim.provision import create_device
from sshfwup.sim.server_config import base_config, deep_merge, write_checked
from sshfwup.sim.teardown import cleanup
from sshfwup.system.fsutil import write_atomically

log = logging.getLogger(__name__)

__all__ = [
    "DEVICE_JSON",
    "MACHINE_LOCK",
    "MARKER_ENV",
    "OWNER_ENV",
    "OWNER_FILE",
    "RUNTIME_BASE",
    "LoopDevice",
    "ProvisionError",
    "SimDevice",
    "SimError",
    "app_interpreter",
    "claim",
    "cleanup",
    "current_owner",
    "ensure_app_user",
    "owner_of",
    "runtime_dir",
    "kill_marked_processes",
    "lock_holders",
    "loop_devices",
    "machine_pids",
    "marked_processes",
    "mounts",
]

DEVICE_JSON = "device.json"
APP_FSTYPE = "ext4"


class SimDevice:
    """A simulated device in a directory. Power and mounts are driven by the machine."""

    def __init__(
        self,
        path: Path,
        *,
        layout: Layout,
        fwup: str,
        ssh_port: int,
        app_port: int,
        config_overrides: Mapping[str, Any] | None = None,
        server_command: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path).resolve()
        self.layout = layout
        self.fwup = fwup
        self.ssh_port = ssh_port
        self.app_port = app_port
        self.config_overrides: dict[str, Any] = dict(config_overrides or {})
        self.server_command = list(server_command) if server_command else None

    # --- paths

    @property
    def disk(self) -> Path:
        return self.path / "disk.img"

    @property
    def fw_env_config(self) -> Path:
        return self.path / "fw_env.config"

    @property
    def root_dir(self) -> Path:
        return runtime_dir(self.path) / "root"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def run_dir(self) -> Path:
        return runtime_dir(self.path) / "run"

    @property
    def config_path(self) -> Path:
        return self.path / "sshfwup.toml"

    @property
    def machine_json(self) -> Path:
        return self.path / "machine.json"

    @property
    def server_data_dir(self) -> Path:
        return self.data_dir / "sshfwup"

    @property
    def device_json(self) -> Path:
        return self.path / DEVICE_JSON

    def __repr__(self) -> str:
        return f"SimDevice({str(self.path)!r})"

    # --- creation (see sim/provision.py) and the record of it

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        firmware: Path,
        layout: Layout | None = None,
        fwup: str | None = None,
        authorized_keys: Sequence[str] = (),
        ssh_port: int,
        app_port: int,
        config_overrides: Mapping[str, Any] | None = None,
        ops_conf: Path | None = None,
    ) -> SimDevice:
        """Make a new device like a factory would: blank disk, fwup ``complete``, empty data fs.
        ``layout`` None: the disk the firmware's fwup.conf describes; ``ops_conf``: the system's
        ops archive to build (the fwup-ops contract)."""
        return create_device(
            cls,
            path,
            firmware=firmware,
            layout=layout,
            fwup=fwup,
            authorized_keys=authorized_keys,
            ssh_port=ssh_port,
            app_port=app_port,
            config_overrides=config_overrides,
            ops_conf=ops_conf,
        )

    @classmethod
    def open(cls, path: Path) -> SimDevice:
        """An existing device directory (made by ``create``)."""
        path = Path(path).resolve()
        try:
            saved = json.loads((path / DEVICE_JSON).read_text())
        except FileNotFoundError:
            raise SimError(f"{path} is not a simulated device ({DEVICE_JSON} missing)") from None
        except (OSError, ValueError) as e:
            raise SimError(f"{path / DEVICE_JSON} is unreadable: {e}") from None
        try:
            return cls(
                path,
                layout=Layout(**saved["layout"]),
                fwup=saved["fwup"],
                ssh_port=int(saved["ssh_port"]),
                app_port=int(saved["app_port"]),
                config_overrides=saved.get("config_overrides") or {},
                server_command=saved.get("server_command"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SimError(f"{path / DEVICE_JSON} is incomplete: {e}") from None

    def save(self) -> None:
        """Record how this device was made (``D/device.json``), for ``open``."""
        saved = {
            "layout": dataclasses.asdict(self.layout),
            "fwup": self.fwup,
            "ssh_port": self.ssh_port,
            "app_port": self.app_port,
            "config_overrides": self.config_overrides,
            "server_command": self.server_command,
        }
        write_atomically(self.device_json, json.dumps(saved, indent=2, sort_keys=True) + "\n")

    # --- loop devices

    def _span(self, role: str) -> tuple[int, int]:
        return self.layout.app_span if role == "app" else self.layout.slot_span(role)

    def loops(self) -> dict[str, LoopDevice]:
        """Our attached loop devices by role (a, b, app), matched by offset and size."""
        found: dict[str, LoopDevice] = {}
        for loop in loop_devices(self.disk):
            for role in ROLES:
                if (loop.offset, loop.sizelimit) == self._span(role) and role not in found:
                    found[role] = loop
        return found

    def attach(self) -> dict[str, str]:
        """Power on the disk: loop devices for slot a, slot b (read-only) and app data (rw)."""
        claim(self.path)  # first: a kill right after losetup must leave an owned device
        loops = self.loops()
        for role in ROLES:
            if role in loops:
                continue
            offset, size = self._span(role)
            argv = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
            if role in SLOTS:
                argv.append("--read-only")
            run_tool([*argv, str(self.disk)], what=f"attaching a loop device for {role}")
        loops = self.loops()
        missing = [r for r in ROLES if r not in loops]
        if missing:
            raise SimError(f"loop devices for {missing} did not appear")
        return {role: loop.name for role, loop in loops.items()}

    def is_attached(self) -> bool:
        return set(self.loops()) == set(ROLES)

    def detach(self) -> None:
        """Unmount what uses the disk and detach every loop device over it."""
        self.unmount_all()
        for loop in loop_devices(self.disk):
            run_tool(["losetup", "-d", loop.name], what=f"detaching {loop.name}")

    def slot_device(self, slot: str) -> str:
        """The loop device of a slot (attached)."""
        if slot not in SLOTS:
            raise ValueError(f"no slot {slot!r} (slots are a and b)")
        loop = self.loops().get(slot)
        if loop is None:
            raise SimError(f"slot {slot} of {self.path} has no loop device: the device is powered off")
        return loop.name

    def slot_devices(self) -> dict[str, str]:
        return {slot: self.slot_device(slot) for slot in SLOTS}

    @staticmethod
    def flush(device: str) -> None:
        """Drop a loop device's page cache so it shows what fwup wrote to the image file."""
        run_tool(["blockdev", "--flushbufs", device], what=f"flushing {device}")

    # --- mounts

    def _mounted_at(self, mount_point: Path) -> MountInfo | None:
        found = [m for m in mounts() if m.mount_point == mount_point]
        return max(found, key=lambda m: m.mount_id) if found else None

    def mount_root(self, slot: str, *, fstype: str = "squashfs") -> None:
        """Mount a slot read-only as the running root at ``R/root`` (replacing another slot)."""
        device = self.slot_device(slot)
        current = self._mounted_at(self.root_dir)
        if current is not None:
            if current.source == device:
                return
            unmount_under(self.root_dir)
        self.make_runtime_dirs()
        self.flush(device)
        run_tool(
            ["mount", "-t", fstype, "-o", "ro,nodev,nosuid", device, str(self.root_dir)],
            what=f"mounting slot {slot} ({device}) at {self.root_dir}",
        )

    def running_slot(self) -> str | None:
        """The slot mounted at ``R/root``, from the mount table."""
        current = self._mounted_at(self.root_dir)
        if current is None:
            return None
        for slot, loop in self.loops().items():
            if slot in SLOTS and loop.name == current.source:
                return slot
        return None

    def mount_data(self) -> None:
        """Mount the app data partition read-write at ``D/data``; make sshfwup's data dir."""
        loop = self.loops().get("app")
        if loop is None:
            raise SimError(f"the data partition of {self.path} has no loop device: the device is powered off")
        current = self._mounted_at(self.data_dir)
        if current is None or current.source != loop.name:
            if current is not None:
                unmount_under(self.data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            run_tool(
                ["mount", "-t", APP_FSTYPE, "-o", "nodev,nosuid", loop.name, str(self.data_dir)],
                what=f"mounting the data partition ({loop.name}) at {self.data_dir}",
            )
        self.server_data_dir.mkdir(mode=0o700, exist_ok=True)

    def unmount_all(self) -> None:
        """Unmount everything under ``D`` and its runtime directory (the pipeline's
        run/slots/* too), deepest first."""
        unmount_under(self.path)
        unmount_under(runtime_dir(self.path))

    def make_runtime_dirs(self) -> None:
        """The running root's mount point and the run dir, reachable by the app's user."""
        claim(self.path)
        for directory in (self.root_dir, self.run_dir):
            make_public_dir(directory)

    def cleanup(self) -> None:
        cleanup(self.path)

    def prepare_app_user(self) -> None:
        """Make sure the configured [app] user exists (on this machine: see ensure_app_user)."""
        from sshfwup.config import load_config

        user = load_config(self.config_path).app.user
        if user:
            ensure_app_user(user)

    # --- queries for tests

    def boot_env(self) -> BootEnv:
        return BootEnv(self.fw_env_config)

    def env(self) -> dict[str, str]:
        return self.boot_env().read_sync()

    def set_env(self, **variables: str | None) -> None:
        """Set (None: delete) U-Boot variables, in one write."""
        self.boot_env().write_sync(variables)

    @property
    def contract(self) -> str:
        """The boot contract its bootloader speaks: its server's ``[boot] contract``."""
        boot = self.config_overrides.get("boot")
        return str(boot.get("contract", DEFAULT_CONTRACT)) if isinstance(boot, dict) else DEFAULT_CONTRACT

    def boot_summary(self, *names: str) -> str:
        """The variables that say which slot boots next and whether it validated, then ``names``
        (both simulated contracts keep Nerves' names for these two)."""
        env = self.env()
        return ", ".join(f"{n}={env.get(n, '')}" for n in ("nerves_fw_active", "nerves_fw_validated", *names))

    def boot_validated(self) -> bool:
        return self.env().get("nerves_fw_validated") == "1"

    def read_slot_file(self, slot: str, path: str) -> bytes:
        """Read one file from a slot's filesystem (mounted read-only at a temporary directory)."""
        return slot_peek.read_slot_file(self, slot, path)

    def slot_bytes_sha256(self, slot: str, length: int) -> str:
        """sha256 of the first ``length`` bytes of a slot, read from the disk image itself."""
        return slot_peek.slot_bytes_sha256(self.disk, self.layout, slot, length)

    # --- server configuration (see sim/server_config.py)

    def write_config(self, **overrides: Any) -> Path:
        """Write ``D/sshfwup.toml``. Overrides deep-merge (``app={"strategy": "stop-first"}``)
        and are remembered, so later rewrites (each power-on) keep them."""
        merged = deep_merge(self.config_overrides, overrides)
        write_checked(self.config_path, deep_merge(base_config(self), merged))
        if merged != self.config_overrides:
            self.config_overrides = merged
            self.save()
        return self.config_path

    def set_server_command(self, argv: Sequence[str] | None) -> None:
        """The command the machine starts the server with from its next (re)start on
        (``{config}`` and ``{device}`` are substituted); None: ``sshfwup serve``. Tests use it to
        run the server under an entry point that installs a test seam."""
        self.server_command = list(argv) if argv else None
        self.save()

    def refresh_slots(self) -> Path:
        """Point ``[device] slots`` at the current loop devices, keeping every other setting."""
        try:
            document = tomllib.loads(self.config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            log.warning("%s missing or unreadable; writing it afresh", self.config_path)
            return self.write_config()
        document.setdefault("device", {})["slots"] = self.slot_devices()
        write_checked(self.config_path, document)
        return self.config_path

    # --- removal

    def destroy(self) -> None:
        """Clean up and delete the whole directory."""
        cleanup(self.path)
        shutil.rmtree(self.path)
