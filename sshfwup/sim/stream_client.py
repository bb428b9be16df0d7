"""A client holding the sample app's ``GET /stream`` open: the long-lived connection a hot update
must not cut (tests, bench/handoff.py, the demo).

Each line the app sends is ``"<seq> <version>\\n"``, seq counting from 0 on the connection; the
client records them, notes when the server closed the connection, and the longest silence
between two lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
import anyio.abc

__all__ = ["StreamClient"]

MAX_HEAD = 16 * 1024


@dataclass
class StreamClient:
    port: int
    interval: float = 0.05  # seconds between the app's lines
    host: str = "127.0.0.1"
    lines: list[tuple[int, str]] = field(default_factory=list)
    closed: bool = False  # the server ended the connection
    longest_silence: float = 0.0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, and read lines until the server closes or the caller cancels; ``started``
        once the response head arrived."""
        async with await anyio.connect_tcp(self.host, self.port) as conn:
            await conn.send(f"GET /stream?interval={self.interval:g} HTTP/1.1\r\nHost: device\r\n\r\n".encode())
            buffer, started, last = b"", False, time.monotonic()
            while True:
                try:
                    buffer += await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    self.closed = True
                    return
                now = time.monotonic()
                if not started:
                    if b"\r\n\r\n" not in buffer:
                        if len(buffer) > MAX_HEAD:
                            raise ValueError("no end of the response head")
                        continue
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise ValueError(f"the stream was refused: {head[:80]!r}")
                    started = True
                    task_status.started()
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    seq, _, version = line.decode().partition(" ")
                    self.lines.append((int(seq), version))
                    if len(self.lines) > 1:
                        self.longest_silence = max(self.longest_silence, now - last)
                    last = now

    def versions(self) -> list[str]:
        """The versions that sent the lines, in order, one entry per run of lines."""
        runs: list[str] = []
        for _, version in self.lines:
            if not runs or runs[-1] != version:
                runs.append(version)
        return runs

    def first_break(self) -> str | None:
        """None if the sequence is 0, 1, 2, ... with no gap and no repeat; else where it broke."""
        for index, (seq, _) in enumerate(self.lines):
            if seq != index:
                around = [s for s, _ in self.lines[max(0, index - 3) : index + 3]]
                return f"line {index} is {seq}: ...{around}"
        return None

    @property
    def dropped(self) -> bool:
        """Cut, or broken: what a hot update must not do to a long-lived connection."""
        return self.closed or self.first_break() is not None
