"""Stock servers swapped under unthrottled load: 0 failed requests for every server (issue #15).

For each server — the sample app, gunicorn (``--preload``), uvicorn ``--fd 3``, hypercorn
``--bind fd://3``, each with two versions of a tiny app (tests/apps/stock.py) — and each socket
path, and each load mode (a new connection per request, keep-alive): hey runs unthrottled
(``-c 8``, no rate limit) for the whole run while the supervisor swaps 8 times between 1.0.0 and
2.0.0 (``observe = 1``, 1 s of steady load between swaps); the run goes on until it holds
``--min-requests`` requests. hey's results are split into phases (``swap-N``: from the start of
swap N to its end; ``steady-N``: in between), so "p99 during swaps" is the worst p99 of the 8
swap phases.

Socket paths (sshfwup.listeners): ``reuseport+migrate`` (net.ipv4.tcp_migrate_req = 1),
``reuseport`` (= 0) and, for comparison, ``shared`` (one socket for every version — the way
before issue #15). The setting is per network namespace: the script re-runs itself in a network
namespace of its own (``unshare --net``, loopback only), so it can set it per run without
touching the host; ``--no-netns`` runs in the host's namespace with the host's setting (then only
that steered path and ``shared``).

Target: 0 failed of >= 50 000 requests for every server on the steered paths, in both modes.

    .venv/bin/python bench/stock_servers.py [--quick] [--servers sample,gunicorn,uvicorn,hypercorn]
        [--paths reuseport+migrate,reuseport,shared] [--modes new-connection,keep-alive]
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

from sshfwup.sim.loadgen import LoadGenerator, LoadReport  # noqa: E402
from sshfwup.supervisor import Supervisor, SwapResult  # noqa: E402

MIN_REQUESTS = 50_000
PATHS = ("reuseport+migrate", "reuseport", "shared")
MODES = ("new-connection", "keep-alive")
IN_NETNS = "--in-netns"


@dataclass(frozen=True)
class RunResult:
    server: str
    path: str  # asked for
    mode: str
    report: LoadReport
    swaps: tuple[SwapResult, ...]

    @property
    def swap_phases(self) -> list[Any]:
        return [p for p in self.report.phases if p.name.startswith("swap-")]

    @property
    def steady_phases(self) -> list[Any]:
        return [p for p in self.report.phases if p.name.startswith(("steady-", "tail-"))]

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


def set_migration(enabled: bool) -> None:
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text("1" if enabled else "0")


async def run_one(work: Path, server: stock.StockServer, path: str, mode: str, args: argparse.Namespace) -> RunResult:
    steer = path != "shared"
    if steer and args.netns:
        set_migration(path == "reuseport+migrate")
    directory = work / f"{server.name}-{path}-{mode}"
    directory.mkdir()
    sources = [server.install(directory, "a", "1.0.0"), server.install(directory, "b", "2.0.0")]
    config = server.config(steered=steer, observe=args.observe)
    marker = f"bench-stock-{os.getpid()}-{server.name}"
    swaps: list[SwapResult] = []
    async with Supervisor(config, marker=marker, steer=steer) as sup:
        await sup.start(sources[0])
        url = f"http://127.0.0.1:{sup.sockets[0].sock.getsockname()[1]}/"
        spec = stock.unthrottled(url, concurrency=args.concurrency, keepalive=mode == "keep-alive")
        async with LoadGenerator(spec, first_phase="steady-0") as load:
            await anyio.sleep(args.gap)
            for number in range(1, args.swaps + 1):
                await load.mark(f"swap-{number}")
                swaps.append(await sup.swap(sources[number % 2]))
                await load.mark(f"steady-{number}")
                await anyio.sleep(args.gap)
            for tail in itertools.count(1):  # keep going until the run holds enough requests
                sent = sum(p.sent for p in load.phases)
                if sent >= args.min_requests:
                    break
                rate = sent / (sum(p.duration for p in load.phases) or 1.0)
                await anyio.sleep((args.min_requests - sent) * 1.05 / max(rate, 1.0) + 0.5)
                await load.mark(f"tail-{tail}")
    return RunResult(server.name, path, mode, load.report, tuple(swaps))


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def describe(r: RunResult) -> list[str]:
    rep = r.report
    ready = statistics.median(s.ready_seconds for s in r.swaps)
    handover = statistics.median(s.handover_seconds for s in r.swaps)
    drain = statistics.median(s.drain_seconds for s in r.swaps)
    lines = [
        f"== {r.server} · {r.path} · {r.mode}: hey -c {rep.spec.concurrency} unthrottled"
        f"{'' if rep.spec.keepalive else ' -disable-keepalive'}, {len(r.swaps)} swaps",
        f"requests {rep.sent} ({rep.rate:.0f} req/s), failed {rep.failed}; p99 during swaps {ms(r.p99_swaps)} ms"
        f" (steady {ms(r.p99_steady)} ms); socket path used: {', '.join(sorted(r.socket_paths))}",
        f"swaps (medians): ready {ready:.2f} s, hand-over {handover:.2f} s, drain {drain:.2f} s,"
        f" total {statistics.median(s.total_seconds for s in r.swaps):.2f} s",
    ]
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
    head = f"{'server':<10} {'socket path':<18} {'mode':<15} {'requests':>9} {'req/s':>6} {'failed':>6} {'p99 swaps ms':>12} {'p99 steady ms':>13}"
    rows = [head]
    for r in results:
        rows.append(
            f"{r.server:<10} {'/'.join(sorted(r.socket_paths)):<18} {r.mode:<15} {r.report.sent:>9} {r.report.rate:>6.0f}"
            f" {r.report.failed:>6} {ms(r.p99_swaps):>12} {ms(r.p99_steady):>13}"
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
    with common.workdir("stock-servers") as work:
        for server in servers:
            for path in paths:
                for mode in args.modes:
                    started = time.monotonic()
                    r = await run_one(work, server, path, mode, args)
                    results.append(r)
                    print("\n".join(["", *describe(r)]) + f"\n(run took {time.monotonic() - started:.0f} s)", flush=True)
    print("\n" + "\n".join(table(results)) + "\n")
    targets = []
    for server in servers:
        runs = [r for r in results if r.server == server.name and r.path != "shared"]
        if not runs:
            continue
        failed = sum(r.report.failed for r in runs)
        least = min(r.report.sent for r in runs)
        wrong_path = [r for r in runs if r.socket_paths != {r.path}]
        detail = ", ".join(f"{r.path}/{r.mode}: {r.report.failed} of {r.report.sent}" for r in runs)
        if wrong_path:
            detail += f"; swaps took another socket path: {[sorted(r.socket_paths) for r in wrong_path]}"
        targets.append((f"{server.name}: 0 failed of >= {args.min_requests} per run on the steered paths",
                        failed == 0 and least >= args.min_requests and not wrong_path, detail))  # fmt: skip
    lines = [common.target(*t) for t in targets]  # printed as they are made
    data = {
        "kernel": os.uname().release,
        "netns": args.netns,
        "runs": [
            {"server": r.server, "path": r.path, "mode": r.mode, "socket_paths": sorted(r.socket_paths),
             "requests": r.report.sent, "failed": r.report.failed, "errors": r.report.errors(),
             "req_per_s": r.report.rate, "p99_swaps": r.p99_swaps, "p99_steady": r.p99_steady,
             "ready": [s.ready_seconds for s in r.swaps], "handover": [s.handover_seconds for s in r.swaps],
             "drain": [s.drain_seconds for s in r.swaps]}
            for r in results
        ],  # fmt: skip
        "summary": lines,
    }
    common.save_results("stock_servers_quick" if args.quick else "stock_servers", data)
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
