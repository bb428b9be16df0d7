"""Loop devices and mounts on this machine, through the tools a device's init would run
(``losetup``, ``mount``, ``umount``): listing, attaching and tearing them down.

This kernel sandbox creates no partition nodes (loopNpM), so each partition is its own loop
device over ``disk.img`` with an offset and a size limit.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sshfwup.boot.slots import MountInfo, mounts
from sshfwup.sim.errors import SimError

log = logging.getLogger(__name__)

__all__ = ["LoopDevice", "loop_devices", "mounts", "mounts_under", "run_tool", "umount", "unmount_under"]


def run_tool(argv: Sequence[str], *, what: str, timeout: float = 60.0, stdin: bytes | None = None) -> str:
    """Run a system tool and return its output; SimError (starting with ``what``) when it fails."""
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
    text = run_tool(["losetup", "-J", "-l"], what="listing loop devices")
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


def mounts_under(path: Path) -> list[MountInfo]:
    """The mounts at or below ``path``."""
    return [m for m in mounts() if m.mount_point == path or path in m.mount_point.parents]


def umount(mount_point: Path, *, lazy_fallback: bool = True) -> None:
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
    run_tool(["umount", "-l", str(mount_point)], what=f"unmounting {mount_point}")


def unmount_under(*paths: Path, unmounted: Callable[[Path], object] | None = None) -> None:
    """Unmount everything at or below each of ``paths``, deepest (and most recent) first, telling
    ``unmounted`` each mount point as it goes."""
    for _ in range(100):  # stacked mounts reappear one layer at a time
        found = [m for path in paths for m in mounts_under(path)]
        if not found:
            return
        deepest = max(found, key=lambda m: (len(m.mount_point.parts), m.mount_id))
        umount(deepest.mount_point)
        if unmounted is not None:
            unmounted(deepest.mount_point)
    raise SimError(f"mounts under {', '.join(map(str, paths))} keep reappearing")
