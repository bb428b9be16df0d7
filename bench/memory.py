"""Peak RSS of ``sshfwup serve`` during an upload into slow flash (issue #2).

A simulated device whose ``[fwup] path`` is bench/discard_fwup.py throttled to 20 MB/s, so the
uploader (OpenSSH's ``ssh -s``, which would go ten times faster) is held back by backpressure
alone. For each size the serve process's peak RSS is reset first (``clear_refs`` 5), then VmHWM
is read after the upload (VmRSS is also sampled every 0.25 s as a cross-check): each size's own
peak, in the same server process. Target: ≤ 64 MiB and flat in the upload size (the 1 GiB /
256 MiB ratio within measurement noise, here ≤ 1.10).

    .venv/bin/python bench/memory.py [--quick] [--rate MB/s]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import common
from common import MB, BenchError, GiB, MiB

PEAK_TARGET_MIB = 64
FLAT_TARGET = 1.10


@dataclass(frozen=True)
class MemorySample:
    size: int
    rss_before_mib: float
    peak_mib: float  # max(VmHWM, sampled VmRSS)
    rss_samples_max_mib: float  # max of VmRSS sampled every 0.25 s: a cross-check of VmHWM
    hwm_mib: float
    seconds: float
    mb_s: float


async def measure(sim: common.SimRun, key: common.KeyPair, report_path: Path, payload: Path,
                  size: int) -> MemorySample:  # fmt: skip
    pid = sim.server_pid
    common.reset_peak_rss(pid)
    before = common.status_kib(pid, "VmRSS") / 1024
    sampled: list[float] = [before]

    async def sample_rss() -> None:
        while True:
            sampled.append(common.status_kib(pid, "VmRSS") / 1024)
            await anyio.sleep(0.25)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample_rss)
        result = await common.upload(common.ssh_argv(sim.ssh_port, key), payload)
        tg.cancel_scope.cancel()
    report = common.read_sink_report(report_path)
    # VmHWM and VmRSS come from per-thread counters synced lazily (a few hundred KiB apart at
    # times): take whichever saw more
    hwm = common.status_kib(pid, "VmHWM") / 1024
    peak = max(hwm, max(sampled))
    if result.returncode != 0 or report.payload_bytes != size or report.status != "ok":
        raise BenchError(
            f"upload of {size} bytes failed: ssh exit {result.returncode}, sink got {report.payload_bytes} "
            f"bytes ({report.status}); output: {(result.stdout + result.stderr)[-400:]!r}"
        )
    return MemorySample(size, before, peak, max(sampled), hwm, result.seconds, size / report.data_seconds / MB)


async def main(args: argparse.Namespace) -> int:
    sizes = [64 * MiB, 256 * MiB] if args.quick else [256 * MiB, GiB]
    samples: list[MemorySample] = []
    with common.workdir("memory") as work:
        key = common.make_key(work / "uploader")
        firmware = common.sample_firmware(work, "1.0.0")
        report_path = work / "sink.json"
        overrides = common.sink_overrides(report_path, rate_mb_s=args.rate, expect=max(sizes))
        async with common.sim_device(work, key, firmware, overrides=overrides) as sim:
            pid = sim.server_pid
            start_rss = common.status_kib(pid, "VmRSS") / 1024
            start_hwm = common.status_kib(pid, "VmHWM") / 1024
            print(f"sshfwup serve pid {pid}: RSS {start_rss:.1f} MiB after start-up "
                  f"(start-up peak {start_hwm:.1f} MiB); sink throttled to {args.rate:g} MB/s; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
            for size in sizes:
                payload = common.make_payload(work / "payload", size)
                s = await measure(sim, key, report_path, payload, size)
                payload.unlink()
                samples.append(s)
                print(f"  {common.size_label(size):>8}: RSS before {s.rss_before_mib:5.1f} MiB, "
                      f"peak {s.peak_mib:5.1f} MiB (VmHWM {s.hwm_mib:5.1f}, sampled VmRSS max "
                      f"{s.rss_samples_max_mib:5.1f}), {s.seconds:5.1f} s at {s.mb_s:.1f} MB/s", flush=True)  # fmt: skip
    small, large = samples
    ratio = large.peak_mib / small.peak_mib
    lines = [
        "",
        f"peak RSS of sshfwup serve, uploads into a {args.rate:g} MB/s sink:",
        f"{'size':>8} {'RSS before':>11} {'peak':>13} {'peak - before':>14}",
        *(
            f"{common.size_label(s.size):>8} {s.rss_before_mib:9.1f} M {s.peak_mib:11.1f} M"
            f" {s.peak_mib - s.rss_before_mib:12.1f} M"
            for s in samples
        ),
        f"ratio {common.size_label(large.size)} / {common.size_label(small.size)} peak: {ratio:.3f}",
    ]
    print("\n".join(lines))
    lines += [
        common.target(f"peak RSS <= {PEAK_TARGET_MIB} MiB", max(s.peak_mib for s in samples) <= PEAK_TARGET_MIB,
                      f"highest {max(s.peak_mib for s in samples):.1f} MiB"),
        common.target(f"peak RSS flat in size (ratio <= {FLAT_TARGET})", ratio <= FLAT_TARGET,
                      f"{common.size_label(large.size)}/{common.size_label(small.size)} = {ratio:.3f}"),
    ]  # fmt: skip
    common.save_results(
        "memory_quick" if args.quick else "memory",
        {"rate_mb_s": args.rate, "start_rss_mib": start_rss, "samples": [asdict(s) for s in samples], "summary": lines},
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB and 256 MiB instead of 256 MiB and 1 GiB")
    parser.add_argument("--rate", type=float, default=20.0, help="sink speed in MB/s (default 20: slow flash)")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"memory: {e}")
