"""What a killed ``sshfwup vm run`` may leave behind, found and removed by the next run.

QEMU runs under ``setpriv --pdeathsig KILL``: it dies with the runner, however the runner dies.
Its pidfile and the run's overlay can stay; a later run (or ``sshfwup vm destroy``) kills the
pidfile's process only when its command line is QEMU's *for this directory's overlay* (a reused
pid is left alone), then removes the run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["clear_run_dir", "qemu_pid"]


def qemu_pid(run_dir: Path) -> int | None:
    """The pid in ``run_dir/qemu.pid`` if that process is QEMU running this run dir's overlay."""
    try:
        pid = int((run_dir / "qemu.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    overlay = str(run_dir / "overlay.qcow2").encode()
    if cmdline and b"qemu-system" in cmdline[0] and any(overlay in arg for arg in cmdline):
        return pid
    return None


def _kill(pid: int, timeout: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists():
                return
            # a zombie of ours counts as gone once reaped by its parent; we are not its parent
            try:
                if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                    return
            except OSError:
                return
            time.sleep(0.05)


def clear_run_dir(run_dir: Path) -> bool:
    """Kill a leftover QEMU of ``run_dir`` and remove the directory; True if anything was left."""
    left = False
    pid = qemu_pid(run_dir)
    if pid is not None:
        log.warning("killing QEMU (pid %d) left running by an earlier run of %s", pid, run_dir.parent)
        _kill(pid)
        left = True
    if run_dir.exists():
        left = left or any(run_dir.iterdir())
        shutil.rmtree(run_dir)
    return left
