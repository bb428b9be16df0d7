"""The processes of a simulated machine: everything started under it carries its marker
(``MARKER_ENV``) in its environment, and the machine itself holds ``D/machine.lock`` for its life."""

from __future__ import annotations

import os
from pathlib import Path

from sshfwup.sim.errors import SimError
from sshfwup.system import procs

__all__ = ["MACHINE_LOCK", "MARKER_ENV", "kill_marked_processes", "lock_holders", "machine_pids", "marked_processes"]

#: Every process started under a simulated machine carries ``SSHFWUP_SIM_MACHINE=<D>`` in its
#: environment, so the machine (and ``cleanup``) can find them all, however deep.
MARKER_ENV = "SSHFWUP_SIM_MACHINE"

MACHINE_LOCK = "machine.lock"  # held by the running machine for its whole life


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
