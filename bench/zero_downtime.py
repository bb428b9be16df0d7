"""Zero downtime under load: a hot update while hey drives the sample app (issue #3).

A simulated device runs the sample app (1.0.0, ``ready = "notify"``). hey sends a steady
``--rate`` of requests to the app's port; in the middle, firmware 2.0.0 is uploaded with
``ssh -s`` and the pipeline hot-swaps the app. hey's results are split by phase — before /
during (upload start → the verdict line reaches the uploader) / after — see sshfwup.sim.loadgen.

Also measured from outside: the time from fwup's OK (the ``Success!`` line arriving at the
uploader) to the first ``GET /`` that answers version 2.0.0 (polled on a new connection every
10 ms from that moment).

Done twice: with keep-alive, and with ``-disable-keepalive`` (a new connection per request: every
request goes through the shared listening socket, the part a swap must never drop).
Targets: 0 failed of ≥ 10 000 requests at ≥ 200 req/s; ≤ 1.5 s from fwup OK to the new version.

    .venv/bin/python bench/zero_downtime.py [--quick] [--rate 210] [--mode keepalive|new-connection]
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

from sshfwup.sim.loadgen import LoadGenerator, LoadReport, LoadSpec, poll_version

OK_TO_SERVING_TARGET = 1.5
RATE_TARGET = 200.0
VERDICT = re.compile(r"^sshfwup: (hot reload.*|.*reboot.*|update failed.*|hot reload failed.*)$")
REFUSED = re.compile(r"(\d+) connections? refused")


@dataclass(frozen=True)
class RunResult:
    mode: str
    report: LoadReport
    upload_status: int
    upload_seconds: float
    verdict: str
    ok_to_serving: float | None
    server_refused: int | None


async def run_mode(work: Path, key: KeyPair, fw_old: Path, fw_new: Path, *, keepalive: bool,
                   args: argparse.Namespace) -> RunResult:  # fmt: skip
    mode = "keep-alive" if keepalive else "new connection per request"
    async with common.sim_device(work, key, fw_old) as sim:
        await poll_version(sim.app_url, "1.0.0", timeout=30)
        spec = LoadSpec(sim.app_url, rate=args.rate, concurrency=args.concurrency, keepalive=keepalive)
        ok_at: float | None = None
        serving_at: float | None = None
        verdict = ""
        ok_seen, verdict_seen = anyio.Event(), anyio.Event()

        def on_line(at: float, line: str) -> None:
            nonlocal ok_at, verdict
            if line == "Success!" and ok_at is None:
                ok_at = at
                ok_seen.set()
            elif VERDICT.match(line) and not verdict:
                verdict = line
                verdict_seen.set()

        async with LoadGenerator(spec) as load:
            await anyio.sleep(args.before)
            await load.mark("during")

            async def watch_new_version() -> None:
                nonlocal serving_at
                await ok_seen.wait()
                serving_at = await poll_version(sim.app_url, "2.0.0", timeout=30)

            async def end_during_at_verdict() -> None:
                await verdict_seen.wait()
                await load.mark("after")

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_new_version)
                tg.start_soon(end_during_at_verdict)
                result = await common.upload(common.ssh_argv(sim.ssh_port, key), fw_new, on_line=on_line)
                if not verdict_seen.is_set() or not ok_seen.is_set():
                    tg.cancel_scope.cancel()
            if not verdict:
                raise BenchError(f"{mode}: the upload ended without a verdict (ssh exit {result.returncode}):\n"
                                 f"{result.stdout[-1500:]}{result.stderr[-500:]}")  # fmt: skip
            # keep going until the whole run holds enough requests
            sent = sum(p.sent for p in load.phases)
            needed = max(0, args.min_requests - sent) * 1.05 / args.rate + 1.0
            await anyio.sleep(max(args.after, needed))
        refused = REFUSED.search(verdict)
        return RunResult(
            mode=mode,
            report=load.report,
            upload_status=result.returncode,
            upload_seconds=result.seconds,
            verdict=verdict,
            ok_to_serving=(serving_at - ok_at) if serving_at is not None and ok_at is not None else None,
            server_refused=int(refused.group(1)) if refused else None,
        )


def describe(r: RunResult, args: argparse.Namespace) -> tuple[list[str], list[tuple[str, bool, str]]]:
    rep = r.report
    lines = [
        f"== {r.mode}: hey -c {rep.spec.concurrency} -q {rep.spec.rate / rep.spec.concurrency:g} "
        f"({rep.spec.rate:g} req/s){'' if rep.spec.keepalive else ' -disable-keepalive'}",
        rep.table(),
        f"upload: ssh exit {r.upload_status} after {r.upload_seconds:.1f} s; {r.verdict}",
        "fwup OK → 2.0.0 answering (polled from outside): "
        + (f"{r.ok_to_serving:.3f} s" if r.ok_to_serving is not None else "never seen"),
    ]
    errors = rep.errors()
    if errors:
        lines.append("transport errors: " + "; ".join(f"{n}× {m}" for m, n in errors.items()))
    bad_status = {c: n for p in rep.phases for c, n in p.summary.status_codes if not 200 <= c < 300}
    if bad_status:
        lines.append(f"non-2xx answers: {bad_status}")
    short = "keep-alive" if rep.spec.keepalive else "new-connection"
    targets = [
        (f"{short}: 0 failed of >= {args.min_requests} at >= {RATE_TARGET:g} req/s",
         rep.failed == 0 and rep.sent >= args.min_requests and rep.rate >= RATE_TARGET and r.upload_status == 0,
         f"{rep.failed} failed ({rep.refused} refused) of {rep.sent} at {rep.rate:.0f} req/s; ssh exit {r.upload_status}"),
        (f"{short}: fwup OK -> new version serving <= {OK_TO_SERVING_TARGET} s",
         r.ok_to_serving is not None and r.ok_to_serving <= OK_TO_SERVING_TARGET,
         f"{r.ok_to_serving:.3f} s" if r.ok_to_serving is not None else "never"),
    ]  # fmt: skip
    return lines, targets


async def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.before, args.after, args.min_requests = 3.0, 3.0, 1000
    modes = {"keepalive": [True], "new-connection": [False], "both": [True, False]}[args.mode]
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    results: list[RunResult] = []
    with common.workdir("zero-downtime") as work:
        key = common.make_key(work / "uploader")
        fw_old = common.sample_firmware(work, "1.0.0")
        fw_new = common.sample_firmware(work, "2.0.0")
        for keepalive in modes:
            started = time.monotonic()
            directory = work / ("keepalive" if keepalive else "new-connection")
            directory.mkdir()
            r = await run_mode(directory, key, fw_old, fw_new, keepalive=keepalive, args=args)
            results.append(r)
            print(f"({r.mode}: run took {time.monotonic() - started:.0f} s)", flush=True)
    out: list[str] = []
    all_targets = []
    for r in results:
        lines, targets = describe(r, args)
        print("\n".join(["", *lines]))
        out += lines
        all_targets += targets
    print()
    out += [common.target(*t) for t in all_targets]
    data: dict[str, Any] = {
        "runs": [
            {
                "mode": r.mode,
                "phases": [
                    {"name": p.name, "seconds": p.duration, "sent": p.sent, "failed": p.failed, "refused": p.refused,
                     "p50": p.p50, "p99": p.p99, "errors": dict(p.summary.errors),
                     "status_codes": dict(p.summary.status_codes)}
                    for p in r.report.phases
                ],
                "verdict": r.verdict,
                "ok_to_serving": r.ok_to_serving,
                "upload_status": r.upload_status,
            }
            for r in results
        ],  # fmt: skip
        "summary": out,
    }
    common.save_results("zero_downtime_quick" if args.quick else "zero_downtime", data)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s before and after (about 1 500 requests per mode)")
    parser.add_argument("--mode", choices=("keepalive", "new-connection", "both"), default="both")
    parser.add_argument("--rate", type=float, default=210.0,
                        help="requests per second offered (default 210: hey's ticker lands a little under)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--before", type=float, default=20.0, help="seconds of load before the upload")
    parser.add_argument("--after", type=float, default=25.0, help="at least this many seconds after the verdict")
    parser.add_argument("--min-requests", type=int, default=10_000, help="the after phase runs until this many")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"zero_downtime: {e}")
