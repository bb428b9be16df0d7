"""Slots: which one we run from (from the mount table, never the boot env) and read-only mounts.

The running root is the slot whose block device is mounted at ``root_mount`` (``/`` on a device).
Mounts of the new slot are read-only, ``nodev,nosuid``: the pipeline inspects it and may run the
app from it, but nothing ever writes there outside fwup.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

log = logging.getLogger(__name__)

__all__ = ["MountInfo", "SlotError", "flush_buffers", "is_mounted", "mount_slot", "mounts", "running_root", "unmount"]

BLKFLSBUF = 0x1261  # _IO(0x12, 97)


class SlotError(Exception):
    """A slot could not be found, mounted or unmounted."""


@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    mount_point: Path
    device: tuple[int, int]  # major, minor
    fstype: str
    source: str
    options: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[MountInfo]:
    """The mount table, in mount order (the last mount on a path is the visible one)."""
    result = []
    for line in mountinfo.read_text(errors="surrogateescape").splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        major, minor = (int(x) for x in f[2].split(":"))
        result.append(MountInfo(int(f[0]), Path(_unescape(f[4])), (major, minor), r[0], _unescape(r[1]), f[5]))
    return result


def is_mounted(path: Path) -> bool:
    target = Path(os.path.realpath(path))
    return any(m.mount_point == target for m in mounts())


def _rdev(device: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(device)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def running_root(root_mount: Path, slots: Iterable[tuple[str, Path]]) -> str | None:
    """The slot mounted at ``root_mount``; None when the root is not one of the slots."""
    target = Path(os.path.realpath(root_mount))
    stacked = [m for m in mounts() if m.mount_point == target]
    if not stacked:
        return None
    top = stacked[-1]  # the last mount on a path is the visible one
    for name, device in slots:
        if _rdev(device) == top.device or os.path.realpath(device) == os.path.realpath(top.source):
            return name
    return None


def flush_buffers(device: Path) -> None:
    """Drop a block device's cached pages so a mount sees what fwup just wrote.

    fwup writes the whole disk (or, in the simulator, the image file); a partition or loop
    device keeps its own page cache, which may still hold the slot's previous contents.
    """
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SlotError(f"cannot open {device}: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    except OSError as e:
        log.warning("could not flush buffers of %s: %s", device, e.strerror)
    finally:
        os.close(fd)


async def mount_slot(device: Path, mount_point: Path, *, fstype: str = "squashfs", options: Sequence[str] = ()) -> Path:
    """Mount a slot read-only, ``nodev,nosuid``; replaces a stale mount left at the same place."""
    mount_point.mkdir(parents=True, exist_ok=True)
    if is_mounted(mount_point):
        log.warning("%s is still mounted (left by an earlier run); unmounting it first", mount_point)
        await unmount(mount_point)
    await anyio.to_thread.run_sync(flush_buffers, device)
    opts = ",".join(["ro", "nodev", "nosuid", *options])
    await _run(["mount", "-t", fstype, "-o", opts, str(device), str(mount_point)], f"mount {device} at {mount_point}")
    log.info("mounted %s read-only at %s", device, mount_point)
    return mount_point


async def unmount(mount_point: Path) -> None:
    if not is_mounted(mount_point):
        return
    await _run(["umount", str(mount_point)], f"unmount {mount_point}")
    log.info("unmounted %s", mount_point)


async def _run(args: list[str], what: str) -> None:
    result = await anyio.run_process(args, check=False)
    if result.returncode != 0:
        err = (result.stderr or result.stdout).decode("utf-8", errors="replace").strip()
        raise SlotError(f"could not {what}: {err or f'status {result.returncode}'}")
