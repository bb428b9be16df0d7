"""Tearing a simulated device down completely, whatever state it was left in."""

from __future__ import annotations

import signal
from pathlib import Path

from sshfwup.sim.blockdev import loop_devices, run_tool, unmount_under
from sshfwup.sim.errors import SimError
from sshfwup.sim.machine_procs import kill_marked_processes, machine_pids
from sshfwup.sim.owner import remove_runtime_dir, runtime_dir
from sshfwup.system import procs

__all__ = ["cleanup"]


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
        unmount_under(device_dir)
        unmount_under(runtime_dir(device_dir))
        remove_runtime_dir(device_dir)
    except SimError as e:
        problems.append(str(e))
    for loop in loop_devices(device_dir / "disk.img"):
        try:
            run_tool(["losetup", "-d", loop.name], what=f"detaching {loop.name}")
        except SimError as e:
            problems.append(str(e))
    if problems:
        raise SimError(f"cleanup of {device_dir} incomplete: " + "; ".join(problems))
