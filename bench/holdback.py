#!/usr/bin/env python3
"""What holding back the end of an upload costs: the time from the uploader's last byte to fwup's
OK, with the last 256 KiB held until the end (sshfwup) and without (fwup sees every byte as it
arrives), on the real fwup applying a firmware to a scratch disk image, the bytes arriving at
40 MB/s as from a network. Interleaved rounds, median.

    sudo .venv/bin/python bench/holdback.py [--size-mib 24] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from sshfwup.update.fwup import FwupProcess
from sshfwup.update.holdback import HOLD, Holdback, check_end
from sshfwup.sim.firmware import find_fwup
from sshfwup.sim.layout import DEFAULT_LAYOUT
from sshfwup.sim.rootfs import build_sample_firmware

CHUNK = 256 * 1024  # what one SSH read hands the server, about
RATE = 40e6  # bytes/s the "network" delivers: fwup keeps up, as it does behind a real link


async def apply(fwup: str, disk: Path, data: bytes, hold: bool) -> tuple[float, bool]:
    """Feed ``data`` in chunks; returns (seconds from the last byte received to fwup's OK, ok)."""
    async with FwupProcess(fwup=fwup, devpath=disk, task="complete") as proc:
        holdback = Holdback(HOLD if hold else 0)
        for i in range(0, len(data), CHUNK):
            for piece in holdback.push(data[i : i + CHUNK]):
                await proc.write(piece)
            await anyio.sleep(CHUNK / RATE)
        last_byte = time.perf_counter()
        tail = holdback.tail()
        if hold:
            check_end(tail, len(data))
        if tail:
            await proc.write(tail)
        result = await proc.finish()
        return time.perf_counter() - last_byte, result.success


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=24, help="root filesystem filler (default %(default)s MiB)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    fwup = find_fwup()
    with tempfile.TemporaryDirectory(prefix="sshfwup-bench-holdback-") as tmp:
        work = Path(tmp)
        fw = build_sample_firmware(work / "fw", version="9.9.9", filler=args.size_mib << 20)
        data = fw.read_bytes()
        disk = work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DEFAULT_LAYOUT.disk_bytes)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for hold in (False, True):
                subprocess.run(["sync"], check=False)
                seconds, ok = anyio.run(apply, fwup, disk, data, hold)
                if not ok:
                    print(f"fwup failed (hold={hold})", file=sys.stderr)
                    return 1
                times[hold].append(seconds)
    without, with_ = statistics.median(times[False]), statistics.median(times[True])
    print(f"firmware {len(data) / 2**20:.1f} MiB, {args.rounds} interleaved rounds, median:")
    print(f"  last byte -> fwup OK, fwup sees every byte as it arrives: {without * 1000:7.1f} ms")
    print(f"  last byte -> fwup OK, last {HOLD // 1024} KiB held back (sshfwup):  {with_ * 1000:7.1f} ms")
    print(f"  added latency: {(with_ - without) * 1000:.1f} ms; memory: {HOLD // 1024} KiB per upload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
