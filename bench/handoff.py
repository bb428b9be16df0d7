"""State and connection hand-off under load (issue #14).

A simulated device runs the sample app (1.0.0) with ``[app] handoff = true``. ``--streams``
clients (default 50) each hold a ``GET /stream`` connection (a numbered line every
``--interval`` s) and hey sends a steady ``--rate`` of requests (a new connection each, or ``--keepalive``); in the
middle, firmware 2.0.0 is uploaded with ``ssh -s`` and hot-swapped. The old version carries
``--state`` bytes of extra state (default 1 MiB) that it hands over with the streams.

Figures: failed requests (hey), dropped long-lived connections (a stream that ended, or whose
sequence has a gap or a repeat), the hand-off time the device reports ("took over 50
connections, 1.0 MiB of state ... in X s"), and the longest silence a stream client saw (the old
version pauses from GIVE until the new one is ready). The baseline, in the same run: the same
update without hand-off (the streams end with the old version's drain).

Targets: with hand-off, 0 failed requests and 0 dropped of >= 50 long-lived connections.

    .venv/bin/python bench/handoff.py [--quick] [--streams 50] [--state 1048576]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError, KeyPair

from sshfwup.sim.loadgen import LoadGenerator, LoadSpec, poll_version
from sshfwup.sim.rootfs import build_sample_firmware
from sshfwup.sim.stream_client import StreamClient

VERDICT = re.compile(r"^sshfwup: (hot reload.*|.*reboot.*|update failed.*|hot reload failed.*)$")
TOOK = re.compile(r"took over (\d+) connections?, ([\d.]+ \w+) of state from \S+ \(state version \d+\) in ([\d.]+) s")


@dataclass(frozen=True)
class RunResult:
    handoff: bool
    mode: str  # hey: "keep-alive" or "new connection per request"
    sent: int
    failed: int
    streams: int
    dropped: int
    moved: int  # streams that ended on 2.0.0
    verdict: str
    took: str  # the device's own hand-off line
    handoff_seconds: float | None
    longest_silence: float
    upload_seconds: float


async def run(
    work: Path, key: KeyPair, fw_old: Path, fw_new: Path, *, handoff: bool, args: argparse.Namespace
) -> RunResult:
    overrides = {"app": {"handoff": handoff, "handoff_max_state": max(16 << 20, 2 * args.state), "observe": 2}}
    async with common.sim_device(work, key, fw_old, overrides=overrides) as sim:
        await poll_version(sim.app_url, "1.0.0", timeout=30)
        streams = [StreamClient(sim.device.app_port, args.interval) for _ in range(args.streams)]
        verdict, took = "", ""

        def on_line(at: float, line: str) -> None:
            nonlocal verdict, took
            if VERDICT.match(line) and not verdict:
                verdict = line
            elif "took over" in line and not took:
                took = line

        spec = LoadSpec(sim.app_url, rate=args.rate, concurrency=args.concurrency, keepalive=args.keepalive)
        async with anyio.create_task_group() as holders:
            for stream in streams:
                await holders.start(stream.run)
            async with LoadGenerator(spec) as load:
                await anyio.sleep(args.before)
                await load.mark("during")
                result = await common.upload(common.ssh_argv(sim.ssh_port, key), fw_new, on_line=on_line)
                await load.mark("after")
                await anyio.sleep(args.after)
            holders.cancel_scope.cancel()
        if not verdict:
            raise BenchError(
                f"the upload ended without a verdict (ssh exit {result.returncode}):\n{result.stdout[-1500:]}"
            )
        match = TOOK.search(took)
        silences = [s.longest_silence for s in streams]
        return RunResult(
            handoff=handoff,
            mode="keep-alive" if args.keepalive else "new connection per request",
            sent=load.report.sent,
            failed=load.report.failed,
            streams=len(streams),
            dropped=sum(s.dropped for s in streams),
            moved=sum(s.versions()[-1:] == ["2.0.0"] and not s.closed for s in streams),
            verdict=verdict,
            took=took,
            handoff_seconds=float(match.group(3)) if match else None,
            longest_silence=max(silences, default=0.0),
            upload_seconds=result.seconds,
        )


def describe(r: RunResult) -> list[str]:
    name = "with hand-off" if r.handoff else "baseline, no hand-off"
    lines = [
        f"== {name}",
        f"requests: {r.failed} failed of {r.sent} ({r.mode})",
        f"long-lived connections: {r.dropped} dropped of {r.streams} ({r.moved} went on with 2.0.0)",
        f"longest silence a stream client saw: {r.longest_silence:.3f} s",
        f"upload: {r.upload_seconds:.1f} s; {r.verdict}",
    ]
    if r.took:
        lines.append(f"device: {r.took}")
    return lines


async def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.before, args.after = 2.0, 2.0
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    results: list[RunResult] = []
    with common.workdir("handoff") as work:
        key = common.make_key(work / "uploader")
        behavior = {"state_padding": args.state}
        fw_old = build_sample_firmware(work / "fw-1.0.0", version="1.0.0", app_behavior=behavior)
        fw_new = build_sample_firmware(work / "fw-2.0.0", version="2.0.0", app_behavior=behavior)
        for handoff in (True, False):
            directory = work / ("handoff" if handoff else "baseline")
            directory.mkdir()
            started = time.monotonic()
            results.append(await run(directory, key, fw_old, fw_new, handoff=handoff, args=args))
            print(f"(run took {time.monotonic() - started:.0f} s)", flush=True)
    out: list[str] = []
    for r in results:
        out += describe(r)
    with_handoff = results[0]
    if with_handoff.handoff_seconds is not None:
        out.append(f"hand-off time for {with_handoff.streams} connections and {args.state} bytes of padding: "
                   f"{with_handoff.handoff_seconds:.3f} s (GIVE → TAKE, relayed by the supervisor)")  # fmt: skip
    print("\n".join(["", *out]))
    targets = [
        common.target(
            "with hand-off: 0 failed requests and 0 dropped of >= 50 long-lived connections",
            with_handoff.failed == 0 and with_handoff.dropped == 0 and with_handoff.streams >= 50
            and with_handoff.sent > 0,
            f"{with_handoff.failed} failed of {with_handoff.sent};"
            f" {with_handoff.dropped} dropped of {with_handoff.streams}",
        ),
    ]  # fmt: skip
    common.save_results("handoff_quick" if args.quick else "handoff", {
        "runs": [r.__dict__ for r in results], "summary": out + targets,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s of load before and after the upload")
    parser.add_argument("--streams", type=int, default=50, help="long-lived connections held through the update")
    parser.add_argument("--state", type=int, default=1 << 20, help="bytes of extra state the old version hands over")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between a stream's lines")
    parser.add_argument("--rate", type=float, default=210.0, help="requests per second offered by hey")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--keepalive", action="store_true", help="hey keeps connections alive (default: a new one each)")
    parser.add_argument("--before", type=float, default=5.0, help="seconds of load before the upload")
    parser.add_argument("--after", type=float, default=5.0, help="seconds of load after the verdict")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"handoff: {e}")
