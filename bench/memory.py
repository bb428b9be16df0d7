"""Memory and CPU of ``sshfwup serve`` while fwup is the bottleneck, and the app it protects
(issues #2 and #13).

A simulated device (the sample app running) whose ``[fwup] path`` is bench/discard_fwup.py,
throttled to 20 MB/s (slow flash) — the uploader (OpenSSH's ``ssh -s``, which would go ten times
faster) is held back by backpressure alone — or free-running (the rate is read from a file at
each upload, so the same server process does both).

- **Memory**: for each size the serve process's peak RSS is reset first (``clear_refs`` 5), then
  VmHWM is read after the upload; VmRSS and /proc/PID/smaps_rollup (PSS, USS) are sampled every
  0.25 s. Targets: peak RSS ≤ 40 MiB, flat in size (1 GiB / 256 MiB ≤ 1.10); idle after start
  ≤ 32 MiB (RSS; PSS and USS printed: on a board no other process shares the libraries).
- **CPU while waiting on fwup**: serve's CPU-s per GiB into the 20 MB/s sink vs the same size
  into the free-running sink (the larger size), same process, same run: ≤ 1.2× (no busy waiting).
- **The app under load** (hey at 200 req/s, keep-alive): p99 while idle vs during the 20 MB/s
  upload of the smaller size and during the free-running one of the larger: ≤ 2× idle p99 (an update must not
  starve the service it protects).

    .venv/bin/python bench/memory.py [--quick] [--rate MB/s] [--no-load] [--slow-cpu]
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

from sshfwup.sim.loadgen import LoadGenerator, LoadSpec, poll_version

PEAK_TARGET_MIB = 40
IDLE_TARGET_MIB = 32
FLAT_TARGET = 1.10
WAIT_CPU_TARGET = 1.2
P99_TARGET = 2.0
LOAD_RATE = 200.0


@dataclass(frozen=True)
class MemorySample:
    size: int
    sink_mb_s: float  # 0: free-running
    rss_before_mib: float
    peak_mib: float  # max(VmHWM, sampled VmRSS)
    rss_samples_max_mib: float  # max of VmRSS sampled every 0.25 s: a cross-check of VmHWM
    hwm_mib: float
    pss_max_mib: float  # sampled
    uss_max_mib: float  # sampled
    seconds: float
    mb_s: float
    cpu_s: float  # serve's own utime + stime over the upload

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_s / (self.size / GiB)


async def measure(sim: common.SimRun, key: common.KeyPair, report_path: Path, payload: Path,
                  size: int, sink_mb_s: float) -> MemorySample:  # fmt: skip
    pid = sim.server_pid
    common.reset_peak_rss(pid)
    before = common.status_kib(pid, "VmRSS") / 1024
    sampled: list[common.MemoryFigures] = [common.memory_figures(pid)]

    async def sample_rss() -> None:
        while True:
            sampled.append(common.memory_figures(pid))
            await anyio.sleep(0.25)

    cpu_before = common.cpu_times(pid)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sample_rss)
        result = await common.upload(common.ssh_argv(sim.ssh_port, key), payload)
        tg.cancel_scope.cancel()
    report = common.read_sink_report(report_path)
    await anyio.sleep(0.3)  # the server closes the connection after the client's exit status
    cpu = (common.cpu_times(pid) - cpu_before).total
    # VmHWM and VmRSS come from per-thread counters synced lazily (a few hundred KiB apart at
    # times): take whichever saw more
    hwm = common.status_kib(pid, "VmHWM") / 1024
    rss_max = max(s.rss for s in sampled)
    peak = max(hwm, rss_max)
    if result.returncode != 0 or report.payload_bytes != payload.stat().st_size or report.status != "ok":
        raise BenchError(
            f"upload of {size} bytes failed: ssh exit {result.returncode}, sink got {report.payload_bytes} "
            f"bytes ({report.status}); output: {(result.stdout + result.stderr)[-400:]!r}"
        )
    return MemorySample(size, sink_mb_s, before, peak, rss_max, hwm, max(s.pss for s in sampled),
                        max(s.uss for s in sampled), result.seconds, size / report.data_seconds / MB, cpu)  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    sizes = [64 * MiB, 256 * MiB] if args.quick else [256 * MiB, GiB]
    samples: list[MemorySample] = []
    phases: dict[str, common.Any] = {}
    slow = common.SlowCpu(args.cpu_percent) if args.slow_cpu else None
    with common.workdir("memory") as work:
        key = common.make_key(work / "uploader")
        firmware = common.sample_firmware(work, "1.0.0")
        report_path = work / "sink.json"
        rate_file = work / "sink-rate"
        overrides = common.sink_overrides(report_path, expect=max(sizes), rate_file=rate_file)
        async with common.sim_device(work, key, firmware, overrides=overrides) as sim:
            pid = sim.server_pid
            await poll_version(sim.app_url, "1.0.0", timeout=30)
            await anyio.sleep(1.0)
            idle = common.memory_figures(pid)
            start_hwm = common.status_kib(pid, "VmHWM") / 1024
            print(f"sshfwup serve pid {pid}: after start-up RSS {idle.rss:.1f} MiB, PSS {idle.pss:.1f}, "
                  f"USS {idle.uss:.1f} (start-up peak {start_hwm:.1f} MiB); load average {os.getloadavg()[0]:.2f}",
                  flush=True)  # fmt: skip
            payloads = {size: common.make_payload(work / f"payload-{size}", size) for size in sizes}
            if slow is not None:
                slow.__enter__()
                slow.confine(pid)  # the sink and its shell inherit it when serve starts them
                print(f"serve on a slow CPU: {slow.describe()}", flush=True)
            try:
                spec = LoadSpec(sim.app_url, rate=LOAD_RATE, concurrency=10, keepalive=True)
                load = LoadGenerator(spec, first_phase="idle") if not args.no_load else None
                if load is not None:
                    await load.__aenter__()
                try:
                    idle_cpu = common.cpu_times(pid)
                    await anyio.sleep(args.idle_seconds)
                    idle_cpu_rate = (common.cpu_times(pid) - idle_cpu).total / args.idle_seconds if args.idle_seconds else 0
                    runs = [(size, args.rate) for size in sizes] + [(sizes[-1], 0.0)]
                    for size, rate in runs:
                        phase = f"{common.size_label(size)} at {rate:g} MB/s" if rate else f"{common.size_label(size)} free"
                        rate_file.write_text(f"{rate:g}\n")
                        if load is not None:
                            await load.mark(phase)
                        s = await measure(sim, key, report_path, payloads[size], size, rate)
                        samples.append(s)
                        print(f"  {phase:>20}: RSS before {s.rss_before_mib:5.1f} MiB, peak {s.peak_mib:5.1f} MiB "
                              f"(VmHWM {s.hwm_mib:5.1f}, sampled VmRSS {s.rss_samples_max_mib:5.1f}, PSS "
                              f"{s.pss_max_mib:5.1f}, USS {s.uss_max_mib:5.1f}), {s.seconds:5.1f} s at "
                              f"{s.mb_s:.1f} MB/s, serve CPU {s.cpu_per_gib:.2f} s/GiB", flush=True)  # fmt: skip
                    if load is not None:
                        await load.mark("after")
                        await anyio.sleep(1.0)
                        report = await load.stop()
                        phases = {p.name: p for p in report.phases}
                finally:
                    if load is not None:
                        await load.__aexit__(None, None, None)
            finally:
                if slow is not None:
                    slow.__exit__()
    throttled = [s for s in samples if s.sink_mb_s]
    free = next(s for s in samples if not s.sink_mb_s)
    same = next(s for s in throttled if s.size == free.size)
    small, large = throttled
    ratio = large.peak_mib / small.peak_mib
    wait_ratio = same.cpu_per_gib / free.cpu_per_gib
    where = f" ({slow.describe()})" if slow is not None else ""
    lines = [
        "",
        f"sshfwup serve{where}: idle RSS {idle.rss:.1f} MiB, PSS {idle.pss:.1f}, USS {idle.uss:.1f}; idle CPU "
        f"{idle_cpu_rate * 1000:.0f} ms/s ({'the app under load' if not args.no_load else 'no load'}: app output, probes)",
        f"{'upload':>20} {'RSS before':>11} {'peak RSS':>9} {'peak PSS':>9} {'peak USS':>9} {'CPU-s/GiB':>10}",
        *(
            f"{(common.size_label(s.size) + (f' at {s.sink_mb_s:g} MB/s' if s.sink_mb_s else ' free')):>20}"
            f" {s.rss_before_mib:9.1f} M {s.peak_mib:7.1f} M {s.pss_max_mib:7.1f} M {s.uss_max_mib:7.1f} M"
            f" {s.cpu_per_gib:10.2f}"
            for s in samples
        ),
        f"ratio {common.size_label(large.size)} / {common.size_label(small.size)} peak: {ratio:.3f}; CPU per GiB "
        f"into the {args.rate:g} MB/s sink / free-running ({common.size_label(free.size)}): {wait_ratio:.2f}x",
    ]  # fmt: skip
    targets = [
        (f"peak RSS <= {PEAK_TARGET_MIB} MiB{where}", max(s.peak_mib for s in throttled) <= PEAK_TARGET_MIB,
         f"highest {max(s.peak_mib for s in throttled):.1f} MiB (PSS {max(s.pss_max_mib for s in throttled):.1f}, "
         f"USS {max(s.uss_max_mib for s in throttled):.1f})"),
        (f"peak RSS flat in size (ratio <= {FLAT_TARGET}){where}", ratio <= FLAT_TARGET,
         f"{common.size_label(large.size)}/{common.size_label(small.size)} = {ratio:.3f}"),
        (f"idle RSS after start <= {IDLE_TARGET_MIB} MiB{where}", idle.rss <= IDLE_TARGET_MIB,
         f"RSS {idle.rss:.1f} MiB (PSS {idle.pss:.1f}, USS {idle.uss:.1f})"),
        (f"CPU per GiB into a {args.rate:g} MB/s sink <= {WAIT_CPU_TARGET}x free-running{where}",
         wait_ratio <= WAIT_CPU_TARGET, f"{same.cpu_per_gib:.2f} vs {free.cpu_per_gib:.2f} s/GiB = {wait_ratio:.2f}x"),
    ]  # fmt: skip
    if phases:
        lines.append(f"the app under hey at {LOAD_RATE:g} req/s (keep-alive):")
        lines += [f"  {name:>20}: {p.sent:6d} sent, {p.failed} failed, p50 {_ms(p.p50)} ms, p99 {_ms(p.p99)} ms"
                  for name, p in phases.items()]  # fmt: skip
        idle_p99 = phases["idle"].p99
        for phase in (f"{common.size_label(sizes[0])} at {args.rate:g} MB/s", f"{common.size_label(sizes[-1])} free"):
            p99 = phases[phase].p99
            if idle_p99 and p99:
                targets.append((f"app p99 during the upload ({phase}) <= {P99_TARGET:g}x idle{where}",
                                p99 <= P99_TARGET * idle_p99,
                                f"{p99 * 1000:.1f} ms vs idle {idle_p99 * 1000:.1f} ms = {p99 / idle_p99:.2f}x "
                                f"({phases[phase].sent} requests)"))  # fmt: skip
    print("\n".join(lines))
    lines += [common.target(*t) for t in targets]
    common.save_results(
        ("memory_quick" if args.quick else "memory") + ("_slow_cpu" if slow else ""),
        {"rate_mb_s": args.rate, "idle": asdict(idle), "samples": [asdict(s) for s in samples], "summary": lines},
    )
    return 0


def _ms(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds * 1000:.1f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB and 256 MiB instead of 256 MiB and 1 GiB")
    parser.add_argument("--rate", type=float, default=20.0, help="sink speed in MB/s (default 20: slow flash)")
    parser.add_argument("--no-load", action="store_true", help="no hey load on the app")
    parser.add_argument("--idle-seconds", type=float, default=8.0, help="idle load phase (default 8 s)")
    parser.add_argument("--slow-cpu", action="store_true", help="serve on one core throttled to --cpu-percent")
    parser.add_argument("--cpu-percent", type=float, default=20.0)
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"memory: {e}")
