"""The device's recent log in memory, for ``ssh device logs [-n N] [-f]``.

A :class:`LogRing` is a ``logging.Handler`` that keeps the last lines the server logged — its
own, the update's stage lines, and the application's stdout/stderr, which the supervisor reads
from a pipe and logs line by line (:func:`pump_lines`) with the app's version and pid as record
fields. Like Nerves' RingLogger, it needs no disk and survives nothing: it is for looking at a
device now, the journal (systemd's) keeps the history.

Memory is bounded three ways, so a chatty or hostile app cannot grow the server (256 MiB boards):
at most ``max_lines`` lines, at most ``max_bytes`` of text in all, and no line longer than
``max_line`` characters (longer ones are cut and marked). Followers (``logs -f``) read from the
ring itself: a follower that falls behind by more than the ring holds is told how many lines it
missed instead of making the server buffer them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import anyio.abc

__all__ = ["APP_LOGGER", "LogLine", "LogRing", "RingFormatter", "pump_lines"]

APP_LOGGER = "app"  # the logger the application's output goes to (fields: app_version, app_pid)
MAX_LINES = 2000
MAX_BYTES = 512 * 1024
MAX_LINE = 4096
_CUT = " […cut]"


@dataclass(frozen=True)
class LogLine:
    seq: int  # 1, 2, … for the server's life: a follower's position
    text: str


class RingFormatter(logging.Formatter):
    """``2026-05-01 12:00:00.123 INFO sshfwup.update.update: text``; app output as ``app 2.0.0[1234]: text``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s.%(msecs)03d %(levelname)s %(source)s: %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        version = getattr(record, "app_version", None)
        pid = getattr(record, "app_pid", None)
        record.source = f"app {version}[{pid}]" if version is not None else record.name
        return super().format(record)


class LogRing(logging.Handler):
    """The last lines logged, bounded in count and bytes; followed live by :meth:`follow`."""

    def __init__(self, *, max_lines: int = MAX_LINES, max_bytes: int = MAX_BYTES, max_line: int = MAX_LINE) -> None:
        super().__init__()
        if max_lines < 1 or max_bytes < 1 or max_line <= len(_CUT):
            raise ValueError("log ring bounds must be positive")
        self.max_lines, self.max_bytes, self.max_line = max_lines, max_bytes, max_line
        self.setFormatter(RingFormatter())
        self._lines: deque[LogLine] = deque()
        self._bytes = 0
        self._seq = 0
        self._waiters: set[anyio.Event] = set()
        # Records can come from worker threads (anyio.to_thread): followers live on the loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # --- writing ---------------------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a bad format string must not take the logger down
            self.handleError(record)
            return
        self.append(text)

    def append(self, text: str) -> None:
        """Add one line (cut to ``max_line``), dropping the oldest ones beyond the bounds."""
        if len(text) > self.max_line:
            text = text[: self.max_line - len(_CUT)] + _CUT
        with self._guard:
            self._seq += 1
            self._lines.append(LogLine(self._seq, text))
            self._bytes += len(text)
            while len(self._lines) > self.max_lines or (self._bytes > self.max_bytes and len(self._lines) > 1):
                self._bytes -= len(self._lines.popleft().text)
        self._wake()

    @property
    def _guard(self) -> threading.RLock:
        return self.lock  # type: ignore[return-value]  # logging.Handler's own lock

    # --- reading ---------------------------------------------------------------------------

    def tail(self, n: int | None = None) -> list[LogLine]:
        """The last ``n`` lines (all with None), oldest first."""
        with self._guard:
            lines = list(self._lines)
        return lines if n is None else lines[-n:] if n > 0 else []

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def size(self) -> tuple[int, int]:
        """(lines, bytes of text) held now."""
        with self._guard:
            return len(self._lines), self._bytes

    def since(self, seq: int) -> tuple[int, list[LogLine]]:
        """(lines missed because the ring moved on, lines after ``seq``)."""
        with self._guard:
            first = self._lines[0].seq if self._lines else self._seq + 1
            missed = max(0, first - seq - 1)
            return missed, [line for line in self._lines if line.seq > seq]

    async def follow(self, after: int) -> AsyncIterator[LogLine | int]:
        """Lines after seq ``after`` as they come, forever; an ``int`` says that many were missed."""
        self._bind_loop()
        position = after
        while True:
            changed = anyio.Event()
            self._waiters.add(changed)
            try:
                missed, lines = self.since(position)
                if not missed and not lines:
                    await changed.wait()
                    continue
            finally:
                self._waiters.discard(changed)
            if missed:
                yield missed
            for line in lines:
                position = line.seq
                yield line

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def _wake(self) -> None:
        loop = self._loop
        if loop is None or not self._waiters:
            return
        if threading.get_ident() == self._loop_thread:
            self._set_waiters()
            return
        try:
            loop.call_soon_threadsafe(self._set_waiters)
        except RuntimeError:  # the loop is closed: nobody follows any more
            pass

    def _set_waiters(self) -> None:
        for event in list(self._waiters):
            event.set()


async def pump_lines(
    stream: anyio.abc.ByteReceiveStream, emit: Callable[[str], None], *, max_line: int = MAX_LINE
) -> None:
    """Read ``stream`` to its end and hand ``emit`` one decoded line at a time (``\\r`` and
    trailing blanks stripped). A line longer than ``max_line`` bytes is cut, so a process that
    writes without newlines cannot make the reader buffer without bound."""
    buffer = bytearray()
    cut = False
    try:
        async for chunk in stream:
            buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    break
                if not cut:
                    _emit_line(emit, bytes(buffer[:end]))
                cut = False
                del buffer[: end + 1]
            if len(buffer) > max_line:
                if not cut:
                    _emit_line(emit, bytes(buffer[:max_line]) + _CUT.encode())
                buffer.clear()
                cut = True  # drop the rest of this line, up to its newline
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    if buffer and not cut:
        _emit_line(emit, bytes(buffer))


def _emit_line(emit: Callable[[str], None], raw: bytes) -> None:
    text = raw.decode("utf-8", errors="replace").replace("\r", "").rstrip()
    if text:
        emit(text)
