#!/usr/bin/env python3
"""A fwup-shaped sink for tests: speaks ``--framing``, discards the archive, optionally slowly.

Stands in for fwup where only the transport is under test (memory, backpressure, disconnects):
``sink_fwup.py [--rate MBPS] -a -d DEV -t TASK --framing``. Exit 0 with an ``OK`` packet after
the zero-length packet; exit 1 with an ``ER`` packet when the input ends without it.
"""

import struct
import sys
import time


def packet(kind: bytes, code: int = 0, text: bytes = b"") -> bytes:
    payload = kind + struct.pack(">H", code) + text
    return struct.pack(">I", len(payload)) + payload


def main() -> int:
    rate = 0.0
    if "--rate" in sys.argv:
        rate = float(sys.argv[sys.argv.index("--rate") + 1]) * 1e6
    out = sys.stdout.buffer
    out.write(packet(b"PR", 0))
    out.flush()
    stdin = sys.stdin.buffer.raw
    started = time.monotonic()
    total = 0
    pending = b""
    want = None  # bytes left in the current packet body
    while True:
        data = stdin.read(1 << 20)
        if not data:
            out.write(packet(b"ER", 0, b"unexpected end of input"))
            out.flush()
            return 1
        total += len(data)
        if rate:
            ahead = total / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
        pending += data
        while True:
            if want is None:
                if len(pending) < 4:
                    break
                (want,) = struct.unpack(">I", pending[:4])
                pending = pending[4:]
                if want == 0:
                    out.write(packet(b"PR", 100) + packet(b"OK"))
                    out.flush()
                    return 0
            take = min(want, len(pending))
            pending = pending[take:]
            want -= take
            if want:
                break
            want = None


if __name__ == "__main__":
    sys.exit(main())
