#!/usr/bin/env python3
"""A fake fwup that hangs, for the timeouts the real fwup cannot be made to show.

``hung_fwup.py MODE -a -d DEV -t TASK --framing``:
- ``stop-reading``: reads 64 KiB of its input, then neither reads nor exits;
- ``no-exit``: reads its whole input (to the end packet), then neither answers nor exits.
"""

import struct
import sys
import time


def main() -> int:
    mode = sys.argv[1]
    stdin = sys.stdin.buffer
    if mode == "stop-reading":
        stdin.read(65536)
    else:
        while True:
            header = stdin.read(4)
            if len(header) < 4:
                break
            (n,) = struct.unpack(">I", header)
            if n == 0:
                break
            stdin.read(n)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
