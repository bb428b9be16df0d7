"""The device-wide update lock: an ``flock``'d lock file.

A lock file rather than an in-process flag, so that every updater on the device (a second
sshfwup, a vendor script running fwup by hand with ``flock``) can respect the same lock. Two
concurrent fwup runs on one partition are how boards end up in a reboot loop.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DeviceBusy", "DeviceLock", "LockHolder"]


@dataclass(frozen=True)
class LockHolder:
    pid: int
    who: str
    since: float
    brief: bool = False  # the device's own short work (boot validation): an upload waits for it


    def describe(self) -> str:
        age = max(0.0, time.time() - self.since)
        return f"{self.who} (pid {self.pid}, started {age:.0f} s ago)"


class DeviceBusy(Exception):
    """Another change of the device's state (an upload, a command, the device's own work) holds
    the device lock."""

    def __init__(self, holder: LockHolder | None) -> None:
        self.holder = holder
        # an updater outside sshfwup (flock by hand) writes no holder record
        by = holder.describe() if holder else "an updater outside sshfwup"
        super().__init__(f"the device is busy: {by} holds the update lock; try again when it has finished")


class DeviceLock:
    """Non-blocking exclusive lock. ``acquire()`` raises :class:`DeviceBusy` at once if held."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def fileno(self) -> int | None:
        """The locked descriptor while held (the SSH front hands it to the supervisor for a swap)."""
        return self._fd

    def acquire(self, who: str, *, brief: bool = False) -> None:
        if self._fd is not None:
            raise DeviceBusy(self.holder())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DeviceBusy(self.holder()) from None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for the next uploader's error message. Advisory text only: the flock is the lock.
        info = json.dumps({"pid": os.getpid(), "who": who, "since": time.time(), "brief": brief}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        log.debug("device lock %s taken by %s", self.path, who)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the flock
        log.debug("device lock %s released", self.path)

    def busy(self) -> bool:
        """Whether some updater (this process or another) holds the lock right now."""
        if self._fd is not None:
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        seen = _flocked(st)
        if seen is not None:
            return seen
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def holder(self) -> LockHolder | None:
        try:
            data = json.loads(self.path.read_text() or "null")
            return LockHolder(int(data["pid"]), str(data["who"]), float(data["since"]), data.get("brief") is True)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def __enter__(self) -> "DeviceLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _flocked(st: os.stat_result) -> bool | None:
    """Whether the file is flock'd, from /proc/locks (None: cannot tell). A look that takes no
    lock: probing with a shared flock of our own would, for that instant, make an updater's
    exclusive flock fail — a `status` asked just as an upload starts would refuse the upload."""
    key = f" {os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            return any(" FLOCK " in line and key in line and "->" not in line for line in f)
    except OSError:
        return None
