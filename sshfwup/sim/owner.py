"""Where a device's mount points live (its runtime directory ``R``) and who owns the device
(``R/owner.json``): the process whose death makes the device stale (see ``sim/stale.py``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from sshfwup.sim.blockdev import mounts_under
from sshfwup.sim.errors import SimError
from sshfwup.system import procs
from sshfwup.system.fsutil import write_atomically

__all__ = [
    "OWNER_ENV",
    "OWNER_FILE",
    "RUNTIME_BASE",
    "claim",
    "current_owner",
    "make_public_dir",
    "owner_of",
    "remove_runtime_dir",
    "runtime_dir",
]

RUNTIME_BASE = Path("/run/sshfwup-sim")

#: Who a device's loop devices, mounts and processes belong to: the process that runs the
#: test, the demo or the terminal's ``sshfwup sim run``. ``SimMachine`` puts it into the
#: machine's environment (``PID:START``, see ``procs.ProcessRef``); everything under the machine
#: inherits it. ``R/owner.json`` records it for the whole device, so a later run can tell a
#: device whose owner died (stale: removed by ``sim/stale.py``) from one a live run is using.
OWNER_ENV = "SSHFWUP_SIM_OWNER"
OWNER_FILE = "owner.json"


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
        make_public_dir(runtime)
        record = {"pid": owner.pid, "start": owner.start, "command": procs.command_line(owner.pid)}
        write_atomically(runtime / OWNER_FILE, json.dumps(record, indent=2) + "\n", durable=False)
    return owner


def make_public_dir(path: Path) -> None:
    """``path`` and its missing parents, each 0755 whatever the umask."""
    missing = [p for p in [*reversed(path.parents), path] if not p.exists()]
    for p in missing:
        p.mkdir(exist_ok=True)
        os.chmod(p, 0o755)


def remove_runtime_dir(device_dir: Path) -> None:
    """Remove the (unmounted) runtime directory and its empty parents below RUNTIME_BASE."""
    runtime = runtime_dir(device_dir)
    if mounts_under(runtime):
        raise SimError(f"{runtime} still has mounts")
    shutil.rmtree(runtime, ignore_errors=True)
    for parent in runtime.parents:
        if parent == RUNTIME_BASE or RUNTIME_BASE not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break
