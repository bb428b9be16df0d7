#!/usr/bin/python3
"""A discarding sink that stands where fwup (or an sshd subsystem) would, for the benchmarks.

Two modes:

- framed (default): what sshfwup starts as ``[fwup] path``. It accepts fwup's command line
  (``--apply --no-unmount -d DEV --task T --framing ...``; every option but its own is ignored),
  reads fwup's framed stdin (4-byte big-endian length + payload; a zero-length packet ends the
  input) with large reads, discards the payload, answers ``PR`` packets as the byte count grows
  (like fwup's progress, when ``--sink-expect`` gives the total) and an ``OK`` packet at the end.
- raw (``--raw``): what OpenSSH's sshd runs as ``Subsystem fwup``: stdin until EOF, discarded.

Both can be throttled (``--sink-rate MB/s``: a slow flash; ``--sink-rate-file F``: the MB/s
written in F when the sink starts, so one device can upload at several rates) and write a JSON report at exit
(``--sink-report FILE``, replaced atomically): bytes, first-byte and end time on the system-wide
monotonic clock (comparable with the benchmark's ``time.monotonic()``), and the sink's own CPU
time (user and system; itself and its reaped children, e.g. a shell's start-up work), so a
benchmark can subtract it from a server's total.

Only the standard library; the shebang names the system python3 on purpose: a PATH lookup could
land on a version manager's shim (pyenv here) and time its start-up instead.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import sys
import time
from dataclasses import asdict, dataclass

READ_SIZE = 1 << 20  # as large as the pipe sshfwup sets up (F_SETPIPE_SZ 1 MiB)
HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class SinkOptions:
    raw: bool = False
    rate: float = 0.0  # bytes per second; 0 = as fast as possible
    expect: int = 0  # total bytes expected, for progress packets; 0 = no progress packets
    report: str = ""


@dataclass(frozen=True)
class SinkReport:
    mode: str
    payload_bytes: int
    first_byte_at: float | None  # time.monotonic() of the first payload byte
    ended_at: float  # time.monotonic() when the input ended
    cpu_user: float  # seconds of this process (an exec'ing shell or shim included) and reaped children
    cpu_system: float
    status: str  # "ok" or why the input ended early


def parse_args(argv: list[str]) -> SinkOptions:
    """Our own ``--sink-*``/``--raw`` options; everything else (fwup's command line) is ignored."""
    raw, rate, expect, report = False, 0.0, 0, ""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--raw":
            raw = True
        elif arg in ("--sink-rate", "--sink-rate-file", "--sink-expect", "--sink-report"):
            if i + 1 >= len(argv):
                raise SystemExit(f"discard_fwup: {arg} needs a value")
            value = argv[i + 1]
            i += 1
            if arg == "--sink-rate":
                rate = float(value) * 1e6
            elif arg == "--sink-rate-file":  # read at each start: one device, several rates
                try:
                    with open(value, encoding="ascii") as f:
                        rate = float(f.read()) * 1e6
                except FileNotFoundError:
                    pass
            elif arg == "--sink-expect":
                expect = int(value)
            else:
                report = value
        i += 1
    return SinkOptions(raw=raw, rate=rate, expect=expect, report=report)


class Throttle:
    """Sleep so that the average rate since the first byte stays at or below ``rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start: float | None = None

    def consumed(self, total: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        if self.start is None:
            self.start = now
            return
        ahead = self.start + total / self.rate - now
        if ahead > 0:
            time.sleep(ahead)


def packet(kind: bytes, code: int = 0, text: bytes = b"") -> bytes:
    payload = kind + struct.pack(">H", code) + text
    return HEADER.pack(len(payload)) + payload


def run_raw(opts: SinkOptions, stdin: io.FileIO) -> tuple[int, float | None, str]:
    buf = bytearray(READ_SIZE)
    throttle = Throttle(opts.rate)
    total, first = 0, None
    while True:
        n = stdin.readinto(buf)
        if not n:
            return total, first, "ok"
        if first is None:
            first = time.monotonic()
        total += n
        throttle.consumed(total)


def run_framed(opts: SinkOptions, stdin: io.FileIO) -> tuple[int, float | None, str]:
    out = sys.stdout.buffer
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    throttle = Throttle(opts.rate)
    total, first = 0, None
    left = 0  # payload bytes still to come in the current packet
    header = b""  # a packet header split across reads
    percent = -1
    while True:
        n = stdin.readinto(buf)
        if not n:
            return total, first, "input ended without the zero-length packet"
        if first is None:
            first = time.monotonic()
        pos = 0
        while pos < n:
            if left:
                take = min(left, n - pos)
                left -= take
                pos += take
                total += take
                continue
            need = 4 - len(header)
            header += bytes(view[pos : pos + need])
            pos += min(need, n - pos)
            if len(header) < 4:
                break
            (left,) = HEADER.unpack(header)
            header = b""
            if left == 0:
                out.write(packet(b"PR", 100) + packet(b"OK"))
                out.flush()
                return total, first, "ok" if pos == n else "data after the zero-length packet"
        throttle.consumed(total)
        if opts.expect:
            now = min(99, total * 100 // opts.expect)
            if now != percent:
                percent = now
                out.write(packet(b"PR", percent))
                out.flush()


def write_report(path: str, report: SinkReport) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(asdict(report), f)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    with open(0, "rb", buffering=0, closefd=False) as stdin:  # unbuffered: readinto straight from the pipe
        total, first, status = (run_raw if opts.raw else run_framed)(opts, stdin)
    ended = time.monotonic()
    if opts.report:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        write_report(
            opts.report,
            SinkReport(
                mode="raw" if opts.raw else "framed",
                payload_bytes=total,
                first_byte_at=first,
                ended_at=ended,
                cpu_user=me.ru_utime + kids.ru_utime,
                cpu_system=me.ru_stime + kids.ru_stime,
                status=status,
            ),
        )
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
