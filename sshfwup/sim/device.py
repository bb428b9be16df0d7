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
    R/owner.json      who owns the device (pid + start time; see OWNER_ENV and sim/stale.py)

This kernel sandbox creates no partition nodes (loopNpM), so each partition is its own loop
device over ``disk.img`` with an offset and a size limit. fwup writes ``disk.img`` itself, not
the loop devices, and a loop block device keeps its own page cache: every mount of a slot
flushes that device's buffers first, or it would show the slot as it was before the update.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshfwup.system import procs
from sshfwup.boot.bootenv import BootEnv
from sshfwup.config import AppConfig
from sshfwup.system.fsutil import write_atomically
from sshfwup.firmware.errors import FirmwareError
from sshfwup.update.fwhead import MAX_HEAD, read_head_bytes
from sshfwup.update.installed import record
from sshfwup.sim.firmware import find_fwup
from sshfwup.sim.layout import DEFAULT_LAYOUT, Layout
from sshfwup.sim.rootfs import HOST_INTERPRETERS, INTERPRETER, SITE_PACKAGES
from sshfwup.sim.toml_write import dumps as toml_dumps
from sshfwup.boot.slots import MountInfo, mounts

log = logging.getLogger(__name__)

__all__ = [
    "MACHINE_LOCK",
    "MARKER_ENV",
    "OWNER_ENV",
    "OWNER_FILE",
    "LoopDevice",
    "ProvisionError",
    "SimDevice",
    "SimError",
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

#: Every process started under a simulated machine carries ``SSHFWUP_SIM_MACHINE=<D>`` in its
#: environment, so the machine (and ``cleanup``) can find them all, however deep.
MARKER_ENV = "SSHFWUP_SIM_MACHINE"

SLOTS = ("a", "b")
ROLES = ("a", "b", "app")
DEVICE_JSON = "device.json"
MACHINE_LOCK = "machine.lock"  # held by the running machine for its whole life
RUNTIME_BASE = Path("/run/sshfwup-sim")
APP_FSTYPE = "ext4"

#: Who a device's loop devices, mounts and processes belong to: the process that runs the
#: test, the demo or the terminal's ``sshfwup sim run``. ``SimMachine`` puts it into the
#: machine's environment (``PID:START``, see ``procs.ProcessRef``); everything under the machine
#: inherits it. ``R/owner.json`` records it for the whole device, so a later run can tell a
#: device whose owner died (stale: removed by ``sim/stale.py``) from one a live run is using.
OWNER_ENV = "SSHFWUP_SIM_OWNER"
OWNER_FILE = "owner.json"


class SimError(Exception):
    """The simulated device could not be set up or driven (loop device, mount, config...)."""


class ProvisionError(SimError):
    """Factory provisioning (fwup's ``complete`` task or formatting the data partition) failed."""


# --- system state: loop devices, mounts, processes -------------------------------------------


def _run(argv: Sequence[str], *, what: str, timeout: float = 60.0, stdin: bytes | None = None) -> str:
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise SimError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise SimError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise SimError(f"{what}: {detail or f'{argv[0]} exited with status {proc.returncode}'}")
    return proc.stdout.decode(errors="replace")


@dataclass(frozen=True)
class LoopDevice:
    name: str  # /dev/loopN
    back_file: str
    offset: int
    sizelimit: int
    read_only: bool


def loop_devices(back_file: Path | None = None) -> list[LoopDevice]:
    """Attached loop devices (``losetup -J -l``), optionally only those over ``back_file``."""
    text = _run(["losetup", "-J", "-l"], what="listing loop devices")
    if not text.strip():  # losetup prints nothing at all when no loop device is attached
        return []
    wanted = str(back_file) if back_file is not None else None
    found = []
    for entry in json.loads(text).get("loopdevices", []):
        backing = entry.get("back-file") or ""
        backing = backing.removesuffix(" (deleted)")
        if wanted is not None and backing != wanted:
            continue
        found.append(
            LoopDevice(
                name=entry["name"],
                back_file=backing,
                offset=int(entry.get("offset") or 0),
                sizelimit=int(entry.get("sizelimit") or 0),
                read_only=bool(entry.get("ro")),
            )
        )
    return found


def _mounts_under(path: Path) -> list[MountInfo]:
    return [m for m in mounts() if m.mount_point == path or path in m.mount_point.parents]


def _umount(mount_point: Path, *, lazy_fallback: bool = True) -> None:
    """Unmount, retrying while busy; as a last resort detach lazily (the mount goes when unused)."""
    last = ""
    for _ in range(20):
        proc = subprocess.run(["umount", str(mount_point)], capture_output=True, check=False)
        if proc.returncode == 0:
            return
        last = proc.stderr.decode(errors="replace").strip()
        if "not mounted" in last:
            return
        time.sleep(0.05)
    if not lazy_fallback:
        raise SimError(f"cannot unmount {mount_point}: {last}")
    log.warning("unmounting %s lazily (still busy: %s)", mount_point, last)
    _run(["umount", "-l", str(mount_point)], what=f"unmounting {mount_point}")


def _unmount_under(*paths: Path, unmounted: Callable[[Path], object] | None = None) -> None:
    """Unmount everything at or below each of ``paths``, deepest (and most recent) first, telling
    ``unmounted`` each mount point as it goes."""
    for _ in range(100):  # stacked mounts reappear one layer at a time
        found = [m for path in paths for m in _mounts_under(path)]
        if not found:
            return
        deepest = max(found, key=lambda m: (len(m.mount_point.parts), m.mount_id))
        _umount(deepest.mount_point)
        if unmounted is not None:
            unmounted(deepest.mount_point)
    raise SimError(f"mounts under {', '.join(map(str, paths))} keep reappearing")


def marked_processes(device_dir: Path) -> list[int]:
    """Live processes whose environment carries this device's machine marker."""
    return procs.processes_with(_marker_entry(device_dir))


def kill_marked_processes(device_dir: Path, *, timeout: float = 5.0) -> list[int]:
    """SIGKILL every marked process (repeatedly: a dying parent may just have forked)."""
    sweep = procs.end_processes_with(_marker_entry(device_dir), timeout=timeout)
    if sweep.survivors:
        left = list(sweep.survivors)
        raise SimError(f"processes {left} of the simulated device {device_dir} survived SIGKILL")
    return list(sweep.signalled)


def _marker_entry(device_dir: Path) -> str:
    return f"{MARKER_ENV}={Path(device_dir).resolve()}"


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock/POSIX lock on ``path`` (from ``/proc/locks``)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = []
    with open("/proc/locks", encoding="ascii", errors="replace") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 12345 fe:00:2155479 0 EOF" (blocked waiters have "->")
            if "->" in fields:
                continue
            if len(fields) >= 6 and fields[5] == wanted and fields[4].isdigit():
                holders.append(int(fields[4]))
    return holders


def machine_pids(device_dir: Path) -> list[int]:
    """The running machine of this device: whoever holds ``D/machine.lock`` (held for its life)."""
    return [pid for pid in lock_holders(Path(device_dir).resolve() / MACHINE_LOCK) if procs.alive(pid)]


def runtime_dir(device_dir: Path) -> Path:
    """Where a device's mount points live: below ``/run/sshfwup-sim``, at the device
    directory's own path (so it is still found by that path).

    The app runs from these mounts as its own unprivileged user, which must reach them; the
    device directory itself may sit below a private (0700) directory such as pytest's.
    """
    return RUNTIME_BASE / str(Path(device_dir).resolve()).lstrip("/")


def current_owner() -> procs.ProcessRef:
    """Who owns what this process sets up: the owner handed down in ``OWNER_ENV`` (a machine
    started by ``SimMachine``, and everything under it), else this process itself."""
    inherited = procs.ProcessRef.parse(os.environ.get(OWNER_ENV, ""))
    if inherited is not None:
        return inherited
    me = procs.ProcessRef.of(os.getpid())
    assert me is not None  # our own /proc entry
    return me


def owner_of(device_dir: Path) -> procs.ProcessRef | None:
    """The owner recorded for a device (``R/owner.json``), or None when none is recorded."""
    try:
        raw = json.loads((runtime_dir(device_dir) / OWNER_FILE).read_text())
        return procs.ProcessRef(int(raw["pid"]), int(raw["start"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(device_dir: Path) -> procs.ProcessRef:
    """Record this process's owner (``current_owner``) as the device's, before it attaches or
    mounts anything, unless another owner that is still alive holds it (a machine a test
    started without ``SimMachine`` belongs to the test). Returns the device's owner."""
    owner = current_owner()
    recorded = owner_of(device_dir)
    if recorded is not None and recorded != owner and recorded.alive():
        return recorded
    if recorded != owner:
        runtime = runtime_dir(device_dir)
        _make_public_dir(runtime)
        record = {"pid": owner.pid, "start": owner.start, "command": procs.command_line(owner.pid)}
        write_atomically(runtime / OWNER_FILE, json.dumps(record, indent=2) + "\n", durable=False)
    return owner


def _make_public_dir(path: Path) -> None:
    """``path`` and its missing parents, each 0755 whatever the umask."""
    missing = [p for p in [*reversed(path.parents), path] if not p.exists()]
    for p in missing:
        p.mkdir(exist_ok=True)
        os.chmod(p, 0o755)


def _remove_runtime_dir(device_dir: Path) -> None:
    """Remove the (unmounted) runtime directory and its empty parents below RUNTIME_BASE."""
    runtime = runtime_dir(device_dir)
    if _mounts_under(runtime):
        raise SimError(f"{runtime} still has mounts")
    shutil.rmtree(runtime, ignore_errors=True)
    for parent in runtime.parents:
        if parent == RUNTIME_BASE or RUNTIME_BASE not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break


def cleanup(path: Path) -> None:
    """Tear a simulated device down completely, whatever state it was left in. Safe to repeat.

    Kills its machine and every process started under it, unmounts everything under the
    directory and its runtime directory, removes the runtime directory, and detaches every
    loop device over its disk image.
    """
    device_dir = Path(path).resolve()
    problems: list[str] = []
    machines = machine_pids(device_dir)
    for pid in machines:
        procs.send_signal(pid, signal.SIGKILL)
    procs.wait_gone(machines, 5.0)
    try:
        kill_marked_processes(device_dir)
    except SimError as e:
        problems.append(str(e))
    try:
        _unmount_under(device_dir)
        _unmount_under(runtime_dir(device_dir))
        _remove_runtime_dir(device_dir)
    except SimError as e:
        problems.append(str(e))
    for loop in loop_devices(device_dir / "disk.img"):
        try:
            _run(["losetup", "-d", loop.name], what=f"detaching {loop.name}")
        except SimError as e:
            problems.append(str(e))
    if problems:
        raise SimError(f"cleanup of {device_dir} incomplete: " + "; ".join(problems))


# --- the app's user --------------------------------------------------------------------------


def ensure_app_user(name: str) -> pwd.struct_passwd:
    """The app's unprivileged user ([app] user), created on this machine when missing.

    A real device gets it from its root filesystem; the simulator shares this machine's user
    database, so it adds a system user the way a firmware build would (no home, no login shell).
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--user-group", name]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    if proc.returncode not in (0, 9):  # 9: created meanwhile by someone else
        raise SimError(f"cannot create the app user {name!r}: {proc.stderr.decode(errors='replace').strip()}")
    log.info("created the app user %s", name)
    return pwd.getpwnam(name)


def _may_execute(path: Path, user: pwd.struct_passwd) -> bool:
    """Does ``user`` have x permission on ``path`` (search, for a directory)? By the mode bits."""
    import grp

    st = path.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.pw_gid or user.pw_name in grp.getgrgid(st.st_gid).gr_mem:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


_MIN_PYTHON = (3, 11)
_PYTHON_CHECK = "import sys; print('%d.%d' % sys.version_info[:2])"


def app_interpreter(user: pwd.struct_passwd) -> str:
    """The host Python that the firmware's stand-in ``/usr/bin/python3`` execs for ``user``: the
    first of ``rootfs.HOST_INTERPRETERS`` that ``user`` can run and that is new enough.

    The app runs from the mounted slot as its own user; nothing it runs may come from the
    checkout or a venv (they may sit in a 0700 home). Raises SimError naming what is missing and
    how to install it — before a device is made, not in the machine log once it boots.
    """
    return _app_interpreter(user.pw_name, user.pw_uid, user.pw_gid, HOST_INTERPRETERS)


@functools.lru_cache(maxsize=8)  # the host's interpreters do not change under one process
def _app_interpreter(name: str, uid: int, gid: int, candidates: tuple[str, ...]) -> str:
    wanted = ".".join(map(str, _MIN_PYTHON))
    tried = []
    for candidate in candidates:
        problem = _cannot_run(Path(candidate), name, uid, gid)
        if problem is None:
            return candidate
        tried.append(f"{candidate}: {problem}")
    raise SimError(
        f"the simulated device runs its app as the user {name!r} with the host's Python (the firmware's"
        f" /usr/bin/python3 execs {' or '.join(candidates)}), but there is no Python >= {wanted} that"
        f" {name!r} can run ({'; '.join(tried)}); install one: apt-get install python3"
    )


def _cannot_run(path: Path, name: str, uid: int, gid: int) -> str | None:
    """Why ``uid`` cannot run ``path`` as a Python >= _MIN_PYTHON, or None. As root: by running it
    as that user (search permission on every directory, ACLs, the interpreter's own libraries);
    otherwise by the mode bits."""
    if not path.exists():
        return "missing"
    if os.geteuid() != 0 or uid == os.geteuid():
        entry = pwd.getpwuid(uid)
        chain = [path, Path(os.path.realpath(path))]
        if not all(_may_execute(p, entry) for c in chain for p in [*c.parents, c] if p.exists()):
            return f"{name} may not execute it"
        if uid != os.geteuid():
            return None  # cannot switch users to ask its version
    as_user: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        proc = subprocess.run(
            [str(path), "-I", "-S", "-c", _PYTHON_CHECK], capture_output=True, text=True, timeout=30, cwd="/",
            env={"PATH": "/usr/bin:/bin"}, check=False, **as_user,
        )  # fmt: skip
    except OSError as e:
        return f"{name} cannot run it: {e.strerror or e}"
    except subprocess.TimeoutExpired:
        return "it did not answer within 30 s"
    if proc.returncode != 0:
        return f"{name} cannot run it: {(proc.stderr.strip().splitlines() or ['exit status %d' % proc.returncode])[-1]}"
    version = proc.stdout.strip()
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()) or (int(major), int(minor)) < _MIN_PYTHON:
        return f"it is Python {version}"
    return None


# --- the device ----------------------------------------------------------------------------


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    write_atomically(path, text, mode=mode)


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

    def __repr__(self) -> str:
        return f"SimDevice({str(self.path)!r})"

    # --- creation

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        firmware: Path,
        layout: Layout = DEFAULT_LAYOUT,
        fwup: str | None = None,
        authorized_keys: Sequence[str] = (),
        ssh_port: int,
        app_port: int,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> SimDevice:
        """Make a new device like a factory would: blank disk, fwup ``complete``, empty data fs."""
        path = Path(path).resolve()
        firmware = Path(firmware).resolve()
        if not firmware.is_file():
            raise ProvisionError(f"firmware file {firmware} not found")
        if (path / "disk.img").exists() or (path / DEVICE_JSON).exists():
            raise SimError(f"{path} already holds a simulated device (destroy it first)")
        overrides = dict(config_overrides or {})
        # Before anything is made: a device whose app cannot start fails only in its machine log.
        cls(path, layout=layout, fwup="", ssh_port=ssh_port, app_port=app_port,
            config_overrides=overrides).check_app_interpreter()  # fmt: skip
        try:
            fwup = find_fwup(fwup)
        except FirmwareError as e:
            raise ProvisionError(str(e)) from None
        for sub in ("", "data"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        device = cls(
            path,
            layout=layout,
            fwup=fwup,
            ssh_port=ssh_port,
            app_port=app_port,
            config_overrides=config_overrides,
        )
        with open(device.disk, "wb") as f:
            f.truncate(layout.disk_bytes)  # sparse
        env_offset, env_size = layout.uboot_env_span
        _atomic_write(device.fw_env_config, f"{device.disk} 0x{env_offset:x} 0x{env_size:x}\n")
        device._save()
        device._provision(firmware, authorized_keys)
        device.write_config()
        device.prepare_app_user()
        log.info("created simulated device %s from %s", path, firmware.name)
        return device

    def _provision(self, firmware: Path, authorized_keys: Sequence[str]) -> None:
        argv = [self.fwup, "-a", "-d", str(self.disk), "-i", str(firmware), "-t", "complete"]
        proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            raise ProvisionError(f"fwup -t complete failed (exit status {proc.returncode}): {output}")
        try:
            self.attach()
            app_loop = self._loops()["app"].name
            try:
                _run(["mkfs.ext4", "-q", "-F", "-L", "appdata", app_loop], what="formatting the app data partition")
            except SimError as e:
                raise ProvisionError(str(e)) from None
            self.mount_data()
            head = read_head_bytes(firmware.read_bytes()[:MAX_HEAD], final=True)
            if head is not None:  # as a factory would: the resources of what it flashed
                record(self.server_data_dir, "a", head.uuid, head.version, head.resources)
            keys = self.server_data_dir / "authorized_keys"
            _atomic_write(keys, "".join(line.rstrip("\n") + "\n" for line in authorized_keys), mode=0o600)
        finally:
            self.unmount_all()
            self.detach()

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

    def _save(self) -> None:
        saved = {
            "layout": dataclasses.asdict(self.layout),
            "fwup": self.fwup,
            "ssh_port": self.ssh_port,
            "app_port": self.app_port,
            "config_overrides": self.config_overrides,
            "server_command": self.server_command,
        }
        _atomic_write(self.path / DEVICE_JSON, json.dumps(saved, indent=2, sort_keys=True) + "\n")

    # --- loop devices

    def _span(self, role: str) -> tuple[int, int]:
        return self.layout.app_span if role == "app" else self.layout.slot_span(role)

    def _loops(self) -> dict[str, LoopDevice]:
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
        loops = self._loops()
        for role in ROLES:
            if role in loops:
                continue
            offset, size = self._span(role)
            argv = ["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size)]
            if role in SLOTS:
                argv.append("--read-only")
            _run([*argv, str(self.disk)], what=f"attaching a loop device for {role}")
        loops = self._loops()
        missing = [r for r in ROLES if r not in loops]
        if missing:
            raise SimError(f"loop devices for {missing} did not appear")
        return {role: loop.name for role, loop in loops.items()}

    def is_attached(self) -> bool:
        return set(self._loops()) == set(ROLES)

    def detach(self) -> None:
        """Unmount what uses the disk and detach every loop device over it."""
        self.unmount_all()
        for loop in loop_devices(self.disk):
            _run(["losetup", "-d", loop.name], what=f"detaching {loop.name}")

    def slot_device(self, slot: str) -> str:
        """The loop device of a slot (attached)."""
        if slot not in SLOTS:
            raise ValueError(f"no slot {slot!r} (slots are a and b)")
        loop = self._loops().get(slot)
        if loop is None:
            raise SimError(f"slot {slot} of {self.path} has no loop device: the device is powered off")
        return loop.name

    def slot_devices(self) -> dict[str, str]:
        return {slot: self.slot_device(slot) for slot in SLOTS}

    @staticmethod
    def flush(device: str) -> None:
        """Drop a loop device's page cache so it shows what fwup wrote to the image file."""
        _run(["blockdev", "--flushbufs", device], what=f"flushing {device}")

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
            _unmount_under(self.root_dir)
        self.make_runtime_dirs()
        self.flush(device)
        _run(
            ["mount", "-t", fstype, "-o", "ro,nodev,nosuid", device, str(self.root_dir)],
            what=f"mounting slot {slot} ({device}) at {self.root_dir}",
        )

    def running_slot(self) -> str | None:
        """The slot mounted at ``R/root``, from the mount table."""
        current = self._mounted_at(self.root_dir)
        if current is None:
            return None
        for slot, loop in self._loops().items():
            if slot in SLOTS and loop.name == current.source:
                return slot
        return None

    def mount_data(self) -> None:
        """Mount the app data partition read-write at ``D/data``; make sshfwup's data dir."""
        loop = self._loops().get("app")
        if loop is None:
            raise SimError(f"the data partition of {self.path} has no loop device: the device is powered off")
        current = self._mounted_at(self.data_dir)
        if current is None or current.source != loop.name:
            if current is not None:
                _unmount_under(self.data_dir)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            _run(
                ["mount", "-t", APP_FSTYPE, "-o", "nodev,nosuid", loop.name, str(self.data_dir)],
                what=f"mounting the data partition ({loop.name}) at {self.data_dir}",
            )
        self.server_data_dir.mkdir(mode=0o700, exist_ok=True)

    def unmount_all(self) -> None:
        """Unmount everything under ``D`` and its runtime directory (the pipeline's
        run/slots/* too), deepest first."""
        _unmount_under(self.path)
        _unmount_under(runtime_dir(self.path))

    def make_runtime_dirs(self) -> None:
        """The running root's mount point and the run dir, reachable by the app's user."""
        claim(self.path)
        for directory in (self.root_dir, self.run_dir):
            _make_public_dir(directory)

    def cleanup(self) -> None:
        cleanup(self.path)

    def check_app_interpreter(self) -> str:
        """The host Python the app will run on (see app_interpreter); SimError if there is none
        its user can run. The app user is created when missing."""
        user = self.config_overrides.get("app", {}).get("user", AppConfig().user)
        return app_interpreter(ensure_app_user(user) if user else pwd.getpwuid(os.geteuid()))

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

    def read_slot_file(self, slot: str, path: str) -> bytes:
        """Read one file from a slot's filesystem (mounted read-only at a temporary directory)."""
        relative = path.lstrip("/")
        if not relative or ".." in Path(relative).parts:
            raise ValueError(f"expected an absolute path inside the root filesystem, got {path!r}")
        self.make_runtime_dirs()
        mount_point = Path(tempfile.mkdtemp(prefix=f"peek-{slot}-", dir=self.run_dir))
        temp_loop: str | None = None
        mounted = False
        try:
            loop = self._loops().get(slot)
            if loop is None:
                offset, size = self.layout.slot_span(slot)
                temp_loop = _run(
                    ["losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                     "--sizelimit", str(size), str(self.disk)],
                    what=f"attaching slot {slot}",
                ).strip()
                device = temp_loop
            else:
                device = loop.name
                self.flush(device)
            _run(
                ["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid", device, str(mount_point)],
                what=f"mounting slot {slot} ({device})",
            )
            mounted = True
            return (mount_point / relative).read_bytes()
        finally:
            if mounted:
                _umount(mount_point)
            mount_point.rmdir()
            if temp_loop:
                _run(["losetup", "-d", temp_loop], what=f"detaching {temp_loop}")

    def slot_bytes_sha256(self, slot: str, length: int) -> str:
        """sha256 of the first ``length`` bytes of a slot, read from the disk image itself."""
        offset, size = self.layout.slot_span(slot)
        if not 0 <= length <= size:
            raise ValueError(f"length must be between 0 and the slot size {size}, got {length}")
        digest = hashlib.sha256()
        with open(self.disk, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
        return digest.hexdigest()

    # --- server configuration

    def _base_config(self) -> dict[str, Any]:
        loops = self._loops()
        slots = {
            slot: loops[slot].name if slot in loops else str(self.run_dir / f"slot-{slot}.not-attached")
            for slot in SLOTS
        }
        return {
            "server": {
                "listen": "127.0.0.1",
                "port": self.ssh_port,
                "host_key": str(self.server_data_dir / "ssh_host_ed25519_key"),
                "authorized_keys": [str(self.server_data_dir / "authorized_keys")],
                "data_dir": str(self.server_data_dir),
                "run_dir": str(self.run_dir),
                "lock_file": str(self.run_dir / "update.lock"),
                "login_timeout": 10,
            },
            "fwup": {"path": self.fwup, "devpath": str(self.disk)},
            "device": {
                "fw_env_config": str(self.fw_env_config),
                "root_mount": str(self.root_dir),
                "slots": slots,
                "reboot_command": [sys.executable, "-m", "sshfwup.sim", "reboot", str(self.path)],
            },
            "app": {
                # The firmware's own interpreter and its copy of sshfwup.app (sim/rootfs.py), from
                # the tree the app runs from: never the checkout or its venv, which the app's
                # user may not reach (a clone in a 0700 home).
                "command": ["{root}" + INTERPRETER, "{app_dir}/app.py"],
                "env": {"PYTHONPATH": "{root}" + SITE_PACKAGES},
                "app_dir": "/srv/app",
                "sockets": [f"http=tcp:127.0.0.1:{self.app_port}"],
                "ready": "notify",
                "ready_timeout": 10,
                "drain_timeout": 5,
                "observe": 2,
                # the machine finds every process it started by this marker (see MARKER_ENV);
                # the owner lets a later run tell whether they are stale (see OWNER_ENV)
                "pass_env": [MARKER_ENV, OWNER_ENV],
            },
        }

    def _write_checked(self, document: Mapping[str, Any]) -> None:
        from sshfwup.config import ConfigError, parse_config

        text = toml_dumps(document)
        try:
            parse_config(tomllib.loads(text), source=self.config_path)
        except ConfigError as e:
            raise SimError(f"the server configuration would be invalid: {e}") from None
        _atomic_write(self.config_path, text)

    def write_config(self, **overrides: Any) -> Path:
        """Write ``D/sshfwup.toml``. Overrides deep-merge (``app={"strategy": "stop-first"}``)
        and are remembered, so later rewrites (each power-on) keep them."""
        merged = _deep_merge(self.config_overrides, overrides)
        self._write_checked(_deep_merge(self._base_config(), merged))
        if merged != self.config_overrides:
            self.config_overrides = merged
            self._save()
        return self.config_path

    def set_server_command(self, argv: Sequence[str] | None) -> None:
        """The command the machine starts the server with from its next (re)start on
        (``{config}`` and ``{device}`` are substituted); None: ``sshfwup serve``. Tests use it to
        run the server under an entry point that installs a test seam."""
        self.server_command = list(argv) if argv else None
        self._save()

    def refresh_slots(self) -> Path:
        """Point ``[device] slots`` at the current loop devices, keeping every other setting."""
        try:
            document = tomllib.loads(self.config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            log.warning("%s missing or unreadable; writing it afresh", self.config_path)
            return self.write_config()
        document.setdefault("device", {})["slots"] = self.slot_devices()
        self._write_checked(document)
        return self.config_path

    # --- removal

    def destroy(self) -> None:
        """Clean up and delete the whole directory."""
        cleanup(self.path)
        shutil.rmtree(self.path)
