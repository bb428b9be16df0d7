"""Stock servers swapped under unthrottled load: 0 failed requests for every server (issue #15).

For each server — the sample app, gunicorn (``--preload``), uvicorn ``--fd 3``, hypercorn
``--bind fd://3``, each with two versions of a tiny app (tests/apps/stock.py) — and each socket
path, and each load mode (a new connection per request, keep-alive): hey runs unthrottled
(``-c 8``, no rate limit) for the whole run while the supervisor swaps 8 times between 1.0.0 and
2.0.0 (``observe = 1``, 1 s of steady load between swaps); the run goes on until it holds
``--min-requests`` requests. hey's results are split into phases (``swap-N``: from the start of
swap N to its end; ``steady-N``: in between), so "p99 during swaps" is the worst p99 of the 8
swap phases.

Socket paths (sshfwup.supervisor.listeners): ``reuseport+migrate`` (net.ipv4.tcp_migrate_req = 1),
``reuseport`` (= 0) and, for comparison, ``shared`` (one socket for every version — the way
before issue #15). The setting is per network namespace: the script re-runs itself in a network
namespace of its own (``unshare --net``, loopback only), so it can set it per run without
touching the host; ``--no-netns`` runs in the host's namespace with the host's setting (then only
that steered path and ``shared``).

Target: 0 failed of >= 50 000 requests for every server on the steered paths, in both modes.

A swap that fails (the new version is rolled back) ends that run: it is a row like the others,
with the reason, and the run's load is still reported. The summary table is always printed; the
exit status is 1 when any run had a failed swap or could not run (a missed target is a MISS line).
The table's "health max ms": the longest a health check that passed waited to be accepted or
answered under that load (what ``[app] stall_timeout`` must stay well above).

    .venv/bin/python bench/stock_servers.py [--quick] [--servers sample,gunicorn,uvicorn,hypercorn]
        [--paths reuseport+migrate,reuseport,shared] [--modes new-connection,keep-alive]
        [--swaps 8] [--min-requests 50000] [--stall-timeout S] [--broken-release]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError

sys.path.insert(0, str(common.REPO / "tests"))  # tests/apps/stock.py: the servers and their apps
from apps import stock  # noqa: E402

from sshfwup.sim.loadgen import LoadError, LoadGenerator, LoadReport  # noqa: E402
from sshfwup.supervisor.supervisor import Supervisor, SupervisorError, SwapFailed, SwapResult  # noqa: E402

MIN_REQUESTS = 50_000
PATHS = ("reuseport+migrate", "reuseport", "shared")
MODES = ("new-connection", "keep-alive")
IN_NETNS = "--in-netns"


@dataclass(frozen=True)
class RunResult:
    server: str
    path: str  # asked for
    mode: str
    report: LoadReport | None  # None: the run ended before its load did (see failure)
    swaps: tuple[SwapResult, ...]
    planned: int = 0  # swaps asked for
    health_waits: tuple[float, ...] = ()  # seconds each passed health check waited (accepted, or answered)
    failure: str = ""  # why a swap failed (rolled back), or the run could not go on

    @property
    def ok(self) -> bool:
        return not self.failure

    @property
    def sent(self) -> int:
        return self.report.sent if self.report else 0

    @property
    def failed(self) -> int:
        return self.report.failed if self.report else 0

    @property
    def swap_phases(self) -> list[Any]:
        return [p for p in self.report.phases if p.name.startswith("swap-")] if self.report else []

    @property
    def steady_phases(self) -> list[Any]:
        return [p for p in self.report.phases if p.name.startswith(("steady-", "tail-"))] if self.report else []

    @property
    def p99_swaps(self) -> float | None:
        values = [p.p99 for p in self.swap_phases if p.p99 is not None]
        return max(values) if values else None

    @property
    def p99_steady(self) -> float | None:
        values = [p.p99 for p in self.steady_phases if p.p99 is not None]
        return max(values) if values else None

    @property
    def socket_paths(self) -> set[str]:
        return {r.socket_path for r in self.swaps}


class HealthWaits(logging.Handler):
    """Collects how long the supervisor's health checks (observation windows; the shared path's
    proof after the drain) waited to be accepted or answered — sshfwup.supervisor.supervisor.health's debug
    records: what [app] stall_timeout has to stay well above under load."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.waits: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        wait = getattr(record, "health_wait", None)
        if wait is not None:
            self.waits.append(float(wait))


def set_migration(enabled: bool) -> None:
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1" if enabled else "0")


async def run_one(work: Path, server: stock.StockServer, path: str, mode: str, args: argparse.Namespace) -> RunResult:
    steer = path != "shared"
    if steer and args.netns:
        set_migration(path == "reuseport+migrate")
    directory = work / f"{server.name}-{path}-{mode}"
    directory.mkdir()
    sources = [server.install(directory, "a", "1.0.0"),
               server.install(directory, "b", "2.0.0", broken=args.broken_release)]  # fmt: skip
    overrides = {} if args.stall_timeout is None else {"stall_timeout": args.stall_timeout}
    config = server.config(steered=steer, observe=args.observe, **overrides)
    marker = f"bench-stock-{os.getpid()}-{server.name}"
    swaps: list[SwapResult] = []
    failure = ""
    load: LoadGenerator | None = None
    waits = HealthWaits()
    health_log = logging.getLogger("sshfwup.supervisor.supervisor.health")
    health_log.addHandler(waits)
    health_log.setLevel(logging.DEBUG)
    health_log.propagate = False  # collected here, not printed
    try:
        async with Supervisor(config, marker=marker, steer=steer) as sup:
            await sup.start(sources[0])
            url = f"http://127.0.0.1:{sup.sockets[0].sock.getsockname()[1]}/"
            spec = stock.unthrottled(url, concurrency=args.concurrency, keepalive=mode == "keep-alive")
            async with LoadGenerator(spec, first_phase="steady-0") as load:
                await anyio.sleep(args.gap)
                for number in range(1, args.swaps + 1):
                    await load.mark(f"swap-{number}")
                    try:
                        swaps.append(await sup.swap(sources[number % 2]))
                    except SwapFailed as e:
                        # the row says why; the load up to here is still measured
                        failure = f"swap {number} rolled back: {e}"
                        await load.mark(f"failed-{number}")
                        break
                    await load.mark(f"steady-{number}")
                    await anyio.sleep(args.gap)
                for tail in itertools.count(1):  # keep going until the run holds enough requests
                    sent = sum(p.sent for p in load.phases)
                    if failure or sent >= args.min_requests:
                        break
                    rate = sent / (sum(p.duration for p in load.phases) or 1.0)
                    await anyio.sleep((args.min_requests - sent) * 1.05 / max(rate, 1.0) + 0.5)
                    await load.mark(f"tail-{tail}")
    except (SupervisorError, LoadError, OSError, ExceptionGroup) as e:  # a start that failed, hey gone: this run only
        failure = f"could not run: {e}"
    finally:
        health_log.removeHandler(waits)
    report = load.report if load is not None and load.phases else None
    return RunResult(server.name, path, mode, report, tuple(swaps), planned=args.swaps, failure=failure,
                     health_waits=tuple(waits.waits))  # fmt: skip


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def describe(r: RunResult) -> list[str]:
    rep = r.report
    head = f"== {r.server} · {r.path} · {r.mode}: {len(r.swaps)} of {r.planned} swaps"
    if rep is None:
        return [head, f"FAILED: {r.failure}"]
    lines = [
        f"{head}; hey -c {rep.spec.concurrency} unthrottled{'' if rep.spec.keepalive else ' -disable-keepalive'}",
        f"requests {rep.sent} ({rep.rate:.0f} req/s), failed {rep.failed}; p99 during swaps {ms(r.p99_swaps)} ms"
        f" (steady {ms(r.p99_steady)} ms); socket path used: {', '.join(sorted(r.socket_paths)) or '-'}",
    ]
    if r.swaps:
        ready = statistics.median(s.ready_seconds for s in r.swaps)
        handover = statistics.median(s.handover_seconds for s in r.swaps)
        drain = statistics.median(s.drain_seconds for s in r.swaps)
        lines.append(f"swaps (medians): ready {ready:.2f} s, hand-over {handover:.2f} s, drain {drain:.2f} s,"
                     f" total {statistics.median(s.total_seconds for s in r.swaps):.2f} s")  # fmt: skip
    if r.health_waits:
        waits = sorted(r.health_waits)
        lines.append(f"health checks passed: {len(waits)}, accepted or answered after median"
                     f" {ms(statistics.median(waits))} ms, max {ms(waits[-1])} ms"
                     " ([app] stall_timeout: 5 s by default)")  # fmt: skip
    if r.failure:
        lines.append(f"FAILED: {r.failure}")
    errors = rep.errors()
    if errors:
        # hey names the client's port in each message: group by what happened
        kinds: dict[str, int] = {}
        for message, n in errors.items():
            kind = message.rsplit(": ", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + n
        lines.append("errors: " + "; ".join(f"{n}× {kind}" for kind, n in sorted(kinds.items())))
    bad = {c: n for p in rep.phases for c, n in p.summary.status_codes if not 200 <= c < 300}
    if bad:
        lines.append(f"non-2xx answers: {bad}")
    return lines


def table(results: list[RunResult]) -> list[str]:
    head = (f"{'server':<10} {'socket path':<18} {'mode':<15} {'swaps':>5} {'requests':>9} {'req/s':>6} {'failed':>6}"
            f" {'p99 swaps ms':>12} {'p99 steady ms':>13} {'health max ms':>13}  result")  # fmt: skip
    rows = [head]
    for r in results:
        rate = f"{r.report.rate:>6.0f}" if r.report else f"{'-':>6}"
        swaps = f"{len(r.swaps)}/{r.planned}"
        rows.append(
            f"{r.server:<10} {'/'.join(sorted(r.socket_paths)) or r.path:<18} {r.mode:<15} {swaps:>5} {r.sent:>9} {rate}"
            f" {r.failed:>6} {ms(r.p99_swaps):>12} {ms(r.p99_steady):>13} {ms(max(r.health_waits, default=None)):>13}"
            f"  {'ok' if r.ok else 'FAILED: ' + r.failure}"
        )
    return rows


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    os.environ.setdefault("UVICORN_LOG_LEVEL", "warning")  # the apps inherit it; no line per start/stop
    servers = [stock.SERVERS[name] for name in args.servers]
    for server in servers:
        if (problem := server.missing()) is not None:
            raise BenchError(problem)
    paths = list(args.paths)
    if not args.netns:
        host_path = stock.expected_socket_path()
        dropped = [p for p in paths if p not in (host_path, "shared")]
        if dropped:
            print(f"(host network namespace, tcp_migrate_req fixed: not running {', '.join(dropped)})")
        paths = [p for p in paths if p in (host_path, "shared")]
    print(f"kernel {os.uname().release}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs;"
          f" {'private network namespace' if args.netns else 'host network namespace'}", flush=True)  # fmt: skip
    results: list[RunResult] = []
    began = time.monotonic()
    with common.workdir("stock-servers") as work:
        try:
            for server in servers:
                for path in paths:
                    for mode in args.modes:
                        started = time.monotonic()
                        r = await run_one(work, server, path, mode, args)
                        results.append(r)
                        print("\n".join(["", *describe(r)]) + f"\n(run took {time.monotonic() - started:.0f} s)",
                              flush=True)  # fmt: skip
        finally:  # whatever ended the runs, the table of those that ran is printed
            print("\n" + "\n".join(table(results)) + f"\n\n({len(results)} runs in {time.monotonic() - began:.0f} s)\n")
    targets = []
    for server in servers:
        runs = [r for r in results if r.server == server.name and r.path != "shared"]
        if not runs:
            continue
        failed = sum(r.failed for r in runs)
        least = min(r.sent for r in runs)
        wrong_path = [r for r in runs if r.ok and r.socket_paths != {r.path}]
        detail = ", ".join(f"{r.path}/{r.mode}: {r.failed} of {r.sent}" for r in runs)
        if wrong_path:
            detail += f"; swaps took another socket path: {[sorted(r.socket_paths) for r in wrong_path]}"
        rolled_back = [r for r in runs if not r.ok]
        if rolled_back:
            failures = "; ".join(f"{r.path}/{r.mode}: {r.failure}" for r in rolled_back)
            detail += f"; {len(rolled_back)} run(s) failed: {failures}"
        targets.append((f"{server.name}: 0 failed of >= {args.min_requests} per run and no rollback on the steered paths",
                        failed == 0 and least >= args.min_requests and not wrong_path and not rolled_back,
                        detail))  # fmt: skip
    lines = [common.target(*t) for t in targets]  # printed as they are made
    data = {
        "kernel": os.uname().release,
        "netns": args.netns,
        "runs": [
            {"server": r.server, "path": r.path, "mode": r.mode, "socket_paths": sorted(r.socket_paths),
             "requests": r.sent, "failed": r.failed, "errors": r.report.errors() if r.report else {},
             "req_per_s": r.report.rate if r.report else None, "p99_swaps": r.p99_swaps, "p99_steady": r.p99_steady,
             "swaps": len(r.swaps), "planned_swaps": r.planned, "failure": r.failure,
             "health_waits": list(r.health_waits),
             "ready": [s.ready_seconds for s in r.swaps], "handover": [s.handover_seconds for s in r.swaps],
             "drain": [s.drain_seconds for s in r.swaps]}
            for r in results
        ],  # fmt: skip
        "summary": lines,
    }
    common.save_results("stock_servers_quick" if args.quick else "stock_servers", data)
    failed_runs = [r for r in results if not r.ok]
    if failed_runs:  # a missed target alone is a MISS line, as in every bench script (bench/README.md)
        print(f"stock_servers: {len(failed_runs)} of {len(results)} runs had a failed swap or could not run",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def enter_private_network_namespace() -> None:
    """Re-run this script in a network namespace of its own, loopback up (needs root)."""
    argv = [sys.executable, os.path.abspath(__file__), IN_NETNS, *sys.argv[1:]]
    shell = 'ip link set lo up && exec "$@"'
    os.execvp("unshare", ["unshare", "--net", "--", "sh", "-c", shell, "sh", *argv])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 swaps, 5 000 requests per run")
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(stock.SERVERS))
    parser.add_argument("--paths", type=lambda s: s.split(","), default=list(PATHS))
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--swaps", type=int, default=8)
    parser.add_argument("--observe", type=float, default=1.0, help="[app] observe for every swap (seconds)")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds of steady load between swaps")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--min-requests", type=int, default=MIN_REQUESTS)
    parser.add_argument("--stall-timeout", type=float, default=None,
                        help="[app] stall_timeout for every run (default: the configuration's default)")  # fmt: skip
    parser.add_argument("--broken-release", action="store_true",
                        help="2.0.0 fails to import (gunicorn, uvicorn, hypercorn; not the sample app): the first"
                             " swap fails, which checks that failures are reported")  # fmt: skip
    parser.add_argument("--no-netns", dest="netns", action="store_false",
                        help="run in the host's network namespace with its tcp_migrate_req")  # fmt: skip
    parser.add_argument(IN_NETNS, action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    for name in arguments.servers:
        if name not in stock.SERVERS:
            parser.error(f"unknown server {name!r} (one of {', '.join(stock.SERVERS)})")
    for value in arguments.paths:
        if value not in PATHS:
            parser.error(f"unknown socket path {value!r} (one of {', '.join(PATHS)})")
    for value in arguments.modes:
        if value not in MODES:
            parser.error(f"unknown mode {value!r} (one of {', '.join(MODES)})")
    if arguments.quick:
        arguments.swaps, arguments.min_requests = 2, 5_000
    if arguments.netns and not arguments.in_netns:
        if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
            sys.exit("stock_servers: cannot make a network namespace (run as root, or pass --no-netns)")
        enter_private_network_namespace()
    try:
        sys.exit(anyio.run(main, arguments))
    except BenchError as e:
        sys.exit(f"stock_servers: {e}")
