"""The SSH front's death under load (issue #26): SIGKILL of the front idle, mid-upload,
mid-inspection and mid-swap, each on a fresh simulated device whose sample app (1.0.0) serves
hey's steady load meanwhile.

``sshfwup serve`` is two processes: the supervisor (the service's main pid; it owns the app) and
the SSH front (its child, ``serve --front``: asyncssh, uploads, fwup). The front is killed the way
tests/supervisor/test_front_killed.py kills it: directly while idle; by tests/apps/serve_with_fault.py
(action ``kill-front``) right after the journal records ``receiving`` (mid-upload) or ``mounted``
(mid-inspection); directly 0.3 s after the journal says ``swapping`` (mid-swap). For each point:

- the load (hey, ``--rate`` req/s, a new connection per request unless ``--keepalive``) runs until
  at least ``--requests`` were sent (default 5 000, about 25 s; ``--quick``: 1 000), the kill
  ``--before`` seconds in; "failed" = non-2xx answers + transport errors;
- SSH back: from the SIGKILL (sent here, or for the fault points the front seen dead in /proc,
  polled every 2 ms) to the first ``SSH-2.0-`` banner on a raw TCP connection, and to the first
  successful ``ssh … status --json`` (OpenSSH, a new connection per try); ``status`` on the
  healthy front before the kill is printed beside it (the client's own cost);
- afterwards: the supervisor kept its pid (no service restart, no reboot), the app its pid and
  1.0.0 (mid-swap: 2.0.0 from slot b), the update lock is free, and the journal's stage is the
  expected one (idle: unchanged; mid-upload ``interrupted``; mid-inspection ``installed``;
  mid-swap ``hot``), the cut upload's ``ssh`` exited non-zero.

A failed request, an unexpected stage, a supervisor restart, SSH not back within 30 s or a point
that could not run is a FAILED row and the exit status is 1. Target: SSH back (status) within 1 s
(a MISS line, not a failure).

    .venv/bin/python bench/front_kill.py [--quick] [--requests N] [--points idle,mid-swap] [--keepalive]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError, KeyPair

from sshfwup.sim.device import SimDevice, cleanup
from sshfwup.sim.host import free_port
from sshfwup.sim.loadgen import LoadGenerator, LoadReport, LoadSpec, poll_version
from sshfwup.sim.machine import SimMachine
from sshfwup.system import procs

POINTS = ("idle", "mid-upload", "mid-inspection", "mid-swap")
FAULT_STAGE = {"mid-upload": "receiving", "mid-inspection": "mounted"}
EXPECTED_STAGE = {"mid-upload": "interrupted", "mid-inspection": "installed", "mid-swap": "hot"}
FAST = {"app": {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}}
SERVE_WITH_FAULT = common.REPO / "tests" / "apps" / "serve_with_fault.py"
SSH_BACK_TARGET = 1.0  # seconds: the target
SSH_BACK_LIMIT = 30.0  # seconds: not back by then is a failure
POINT_TIMEOUT = 240.0  # seconds: a point that hangs is a failed row, the others still run


@dataclass
class PointResult:
    point: str
    report: LoadReport | None = None
    banner: float | None = None  # SIGKILL → SSH-2.0- banner, seconds
    status: float | None = None  # SIGKILL → `ssh status --json` answered
    status_before: float | None = None  # one `ssh status --json` on the healthy front
    supervisor_kept: bool | None = None
    supervisor: str = "-"
    app: str = "-"
    stage_before: str | None = None
    stage: str | None = None
    upload_status: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.report is not None

    def verdict(self) -> str:
        return "ok" if self.ok else "FAILED: " + "; ".join(self.problems or ["no load report"])


# --- the device and its processes ----------------------------------------------------------------


@asynccontextmanager
async def device(directory: Path, key: KeyPair, firmware: Path, server_command: list[str] | None
                 ) -> AsyncIterator[common.SimRun]:  # fmt: skip
    """common.sim_device with a server command of our own (the fault seam) and the test's app timings."""
    path = directory / "device"
    try:
        dev = await anyio.to_thread.run_sync(
            lambda: SimDevice.create(
                path, firmware=firmware, authorized_keys=[key.public_line], ssh_port=free_port(),
                app_port=free_port(), config_overrides=FAST,
            )  # fmt: skip
        )
        async with SimMachine.start(dev.path, server_command=server_command) as machine:
            await machine.wait_up(timeout=60)
            yield common.SimRun(dev, machine)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cleanup, path)


def front_pid(sim: common.SimRun) -> int | None:
    """The SSH front: the server's child started with ``--front``."""
    state = sim.machine.state()
    return procs.ssh_front(state.server_pid) if state is not None and state.server_pid is not None else None


def dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2 :].split()[0] == b"Z"


def wait_dead(pid: int, timeout: float) -> float | None:
    """time.monotonic() at which ``pid`` was first seen dead (polled every 2 ms), None if it lived on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dead(pid):
            return time.monotonic()
        time.sleep(0.002)
    return None


def journal_stage(sim: common.SimRun) -> str | None:
    try:
        return json.loads((sim.device.server_data_dir / "journal.json").read_text()).get("stage")
    except FileNotFoundError:
        return None


def ssh_command(sim: common.SimRun, key: KeyPair, *args: str) -> list[str]:
    return ["ssh", *common.SSH_OPTIONS, "-i", str(key.private), "-p", str(sim.ssh_port), "root@127.0.0.1", *args]


async def ssh_status(sim: common.SimRun, key: KeyPair, timeout: float = 30) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        result = await anyio.run_process(ssh_command(sim, key, "status", "--json"), check=False)
    if result.returncode != 0:
        err = result.stderr.decode(errors="replace")[-200:]
        raise BenchError(f"ssh status --json: exit {result.returncode}: {err}")
    return json.loads(result.stdout)


async def app_answer(sim: common.SimRun) -> dict[str, Any]:
    with anyio.fail_after(5):
        async with await anyio.connect_tcp("127.0.0.1", sim.device.app_port) as stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = bytearray()
            async for chunk in stream:
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        raise BenchError(f"the app answered {head[:60]!r}")
    return json.loads(body)


async def until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            if await predicate():
                return
        except (OSError, ValueError, KeyError, BenchError, TimeoutError) as e:
            last = f" (last: {type(e).__name__}: {str(e)[:100]})"
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}{last}")
        await anyio.sleep(interval)


# --- SSH back ----------------------------------------------------------------------------------


async def banner_back(port: int, killed: float) -> float | None:
    """SIGKILL → the first ``SSH-2.0-`` line on a raw TCP connection (connections wait in the
    supervisor's listen backlog while no front accepts)."""
    deadline = killed + SSH_BACK_LIMIT
    while time.monotonic() < deadline:
        try:
            with anyio.fail_after(max(0.05, deadline - time.monotonic())):
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    data = b""
                    while b"\n" not in data:
                        data += await stream.receive()
            if data.startswith(b"SSH-2.0-"):
                return time.monotonic() - killed
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        except TimeoutError:
            return None
        await anyio.sleep(0.01)
    return None


async def status_back(sim: common.SimRun, key: KeyPair, killed: float) -> float | None:
    """SIGKILL → the first ``ssh … status --json`` that exits 0 with the status document."""
    deadline = killed + SSH_BACK_LIMIT
    while time.monotonic() < deadline:
        try:
            with anyio.fail_after(max(0.05, deadline - time.monotonic())):
                result = await anyio.run_process(ssh_command(sim, key, "status", "--json"), check=False)
            if result.returncode == 0 and "update_in_progress" in json.loads(result.stdout):
                return time.monotonic() - killed
        except ValueError:
            pass
        except TimeoutError:
            return None
        await anyio.sleep(0.02)
    return None


# --- one kill point -----------------------------------------------------------------------------


async def run_point(point: str, work: Path, key: KeyPair, fw_old: Path, fw_new: Path, args: argparse.Namespace,
                    r: PointResult) -> None:  # fmt: skip
    server_command = None
    once = work / f"fault-{point}.fired"
    if point in FAULT_STAGE:
        server_command = [sys.executable, str(SERVE_WITH_FAULT), FAULT_STAGE[point], "kill-front", str(once),
                          "--config", "{config}"]  # fmt: skip
    async with device(work, key, fw_old, server_command) as sim:
        await poll_version(sim.app_url, "1.0.0", timeout=30)
        state = sim.machine.state()
        if state is None or state.server_pid is None:
            raise BenchError(f"no server: {state}")
        supervisor, restarts = state.server_pid, state.server_restarts
        app = await app_answer(sim)
        front = front_pid(sim)
        if front is None:
            raise BenchError("no SSH front process (the server's child with --front)")
        r.stage_before = journal_stage(sim)
        spec = LoadSpec(sim.app_url, rate=args.rate, concurrency=args.concurrency, keepalive=args.keepalive)
        upload_result: list[common.UploadResult] = []
        async with LoadGenerator(spec) as load, anyio.create_task_group() as tg:
            load_started = time.monotonic()
            await anyio.sleep(min(1.0, args.before / 2))
            t = time.monotonic()
            await ssh_status(sim, key)
            r.status_before = time.monotonic() - t
            await anyio.sleep(max(0.0, load_started + args.before - time.monotonic()))

            async def go() -> None:
                upload_result.append(await common.upload(common.ssh_argv(sim.ssh_port, key), fw_new, timeout=120))

            # --- the kill
            if point == "idle":
                killed = time.monotonic()
                os.kill(front, signal.SIGKILL)
            elif point == "mid-swap":
                tg.start_soon(go)

                async def swapping() -> bool:
                    return journal_stage(sim) == "swapping"

                await until(swapping, 60, "the journal to say swapping", interval=0.01)
                await anyio.sleep(0.3)  # the supervisor is starting 2.0.0 beside 1.0.0
                killed = time.monotonic()
                os.kill(front, signal.SIGKILL)
            else:  # serve_with_fault kills the front right after the journal records the stage
                tg.start_soon(go)
                seen = await anyio.to_thread.run_sync(wait_dead, front, 60.0)
                if seen is None:
                    raise BenchError(f"the front was not killed at stage {FAULT_STAGE[point]} within 60 s")
                killed = seen
            await load.mark("after")

            # --- SSH back
            times: dict[str, float | None] = {}

            async def measure(name: str, fn: Any, *a: Any) -> None:
                times[name] = await fn(*a)

            async with anyio.create_task_group() as polls:
                polls.start_soon(measure, "banner", banner_back, sim.ssh_port, killed)
                polls.start_soon(measure, "status", status_back, sim, key, killed)
            r.banner, r.status = times.get("banner"), times.get("status")
            if r.status is None:
                r.problems.append(f"SSH not back within {SSH_BACK_LIMIT:g} s")
            new_front = front_pid(sim)
            if new_front in (None, front):
                r.problems.append(f"no new SSH front (front pid {new_front}, was {front})")
            if point in FAULT_STAGE and not once.exists():
                r.problems.append("the fault did not fire")

            # --- the cut update settles
            if point != "idle":
                with anyio.move_on_after(120):
                    while not upload_result:
                        await anyio.sleep(0.05)
                if not upload_result:
                    raise BenchError("the cut upload's ssh did not end within 120 s")
                r.upload_status = upload_result[0].returncode
                if r.upload_status == 0:
                    r.problems.append("the upload succeeded: the front was not cut under it")
                expected = EXPECTED_STAGE[point]

                async def settled() -> bool:
                    return journal_stage(sim) == expected

                try:
                    await until(settled, 30, f"the journal stage {expected}")
                except BenchError:
                    pass
            r.stage = journal_stage(sim)
            if point == "idle":
                if r.stage != r.stage_before:
                    r.problems.append(f"journal stage {r.stage} (was {r.stage_before})")
            elif r.stage != EXPECTED_STAGE[point]:
                r.problems.append(f"journal stage {r.stage}, expected {EXPECTED_STAGE[point]}")

            async def unlocked() -> bool:
                return not (await ssh_status(sim, key))["update_in_progress"]

            try:
                await until(unlocked, 10, "the update lock to be released", interval=0.1)
            except BenchError as e:
                r.problems.append(str(e))
            status = await ssh_status(sim, key)

            # --- the supervisor and the app
            state = sim.machine.state()
            now_pid = state.server_pid if state else None
            r.supervisor_kept = (state is not None and now_pid == supervisor and state.server_restarts == restarts
                                 and state.boot_count == 1)  # fmt: skip
            boots = state.boot_count if state else "?"
            r.supervisor = "kept" if r.supervisor_kept else f"NO ({supervisor} → {now_pid}, boot {boots})"
            if not r.supervisor_kept:
                r.problems.append("the supervisor was restarted")
            if point == "mid-swap":

                async def new_version() -> bool:
                    return (await app_answer(sim)).get("version") == "2.0.0"

                try:
                    await until(new_version, 20, "the app to answer 2.0.0")
                except BenchError as e:
                    r.problems.append(str(e))
                now = await app_answer(sim)
                r.app = f"new {now.get('version')} slot {now.get('slot')}"
                if now.get("version") != "2.0.0" or now.get("slot") != "b" or now.get("pid") == app["pid"]:
                    r.problems.append(f"app after the swap: {now}")
                if not status.get("pending_reboot"):
                    r.problems.append("not pending reboot after the swap")
            else:
                now = await app_answer(sim)
                kept = now.get("pid") == app["pid"] and now.get("version") == "1.0.0"
                r.app = "kept 1.0.0" if kept else f"NO: {now.get('version')} pid {now.get('pid')} (was {app['pid']})"
                if not kept:
                    r.problems.append("the app was restarted or changed")
                env = sim.device.env()
                boot = (env.get("nerves_fw_active"), env.get("nerves_fw_validated"))
                if point == "mid-upload" and boot != ("a", "1"):
                    r.problems.append(f"boot env after the cut upload: active {env.get('nerves_fw_active')}, "
                                      f"validated {env.get('nerves_fw_validated')}")  # fmt: skip
                if point == "mid-inspection" and not (status.get("pending_reboot") and status.get("active") == "b"):
                    r.problems.append(f"not installed for the next boot: active {status.get('active')}, "
                                      f"pending_reboot {status.get('pending_reboot')}")  # fmt: skip

            # --- the load runs on until it holds enough requests
            needed = args.requests * 1.05 / args.rate + 1.0
            await anyio.sleep(max(0.0, load_started + needed - time.monotonic()))
            await load.stop()
        r.report = load.report
        if r.report.failed:
            errors = r.report.errors()
            detail = "; ".join(f"{n}x {m.rsplit(': ', 1)[-1]}" for m, n in list(errors.items())[:3])
            r.problems.insert(0, f"{r.report.failed} failed requests" + (f" ({detail})" if detail else ""))
        if r.report.sent < args.requests:
            r.problems.append(f"only {r.report.sent} requests sent (wanted {args.requests})")


def describe_error(e: BaseException) -> str:
    """The first error inside (task groups wrap what their tasks raised), on one line."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# --- output -------------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def p99_ms(r: PointResult) -> str:
    """The worst phase's p99 (before / after the kill): hey prints percentiles per run."""
    values = [p.p99 for p in r.report.phases if p.p99 is not None] if r.report else []
    return f"{max(values) * 1000:.1f}" if values else "-"


def table(results: list[PointResult]) -> list[str]:
    head = (f"{'point':<15} {'sent':>6} {'failed':>6} {'refused':>7} {'p99 ms':>7} {'SSH back s':>17}"
            f" {'supervisor':>10}  {'app':<22} {'journal stage':<13}  verdict")  # fmt: skip
    lines = [head, f"{'':<44} {'banner / status':>17}"]
    for r in results:
        rep = r.report
        sent, failed, refused = (rep.sent, rep.failed, rep.refused) if rep else ("-", "-", "-")
        back = f"{seconds(r.banner)} / {seconds(r.status)}"
        lines.append(
            f"{r.point:<15} {sent:>6} {failed:>6} {refused:>7} {p99_ms(r):>7} {back:>17} {r.supervisor:>10}"
            f"  {r.app:<22} {r.stage or '(none)':<13}  {r.verdict()}"
        )
    return lines


async def main(args: argparse.Namespace) -> int:
    if args.quick:
        args.requests = 1000
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        raise BenchError(f"unknown points {unknown}; choose from {', '.join(POINTS)}")
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; hey {args.rate:g} req/s -c {args.concurrency}"
          f"{'' if args.keepalive else ' -disable-keepalive'}; >= {args.requests} requests per point, kill at"
          f" {args.before:g} s", flush=True)  # fmt: skip
    results: list[PointResult] = []
    began = time.monotonic()
    with common.workdir("front-kill") as work:
        try:
            key = common.make_key(work / "uploader")
            fw_old = common.sample_firmware(work, "1.0.0")
            fw_new = common.sample_firmware(work, "2.0.0")
        except Exception as e:
            raise BenchError(f"cannot build the sample firmware: {describe_error(e)}") from e
        try:
            for point in points:
                started = time.monotonic()
                r = PointResult(point)
                directory = work / point
                directory.mkdir()
                try:
                    with anyio.fail_after(POINT_TIMEOUT):
                        await run_point(point, directory, key, fw_old, fw_new, args, r)
                except Exception as e:  # a bench never crashes: whatever stopped this point is its row
                    r.problems.append(f"could not run: {describe_error(e)}")
                results.append(r)
                upload_exit = "-" if r.upload_status is None else r.upload_status
                print(f"\n== {point}: run took {time.monotonic() - started:.0f} s; `ssh status` on the healthy front"
                      f" {seconds(r.status_before)} s; upload ssh exit {upload_exit};"
                      f" journal stage before {r.stage_before or '(none)'}", flush=True)  # fmt: skip
                if r.report is not None:
                    print(r.report.table())
                    errors = r.report.errors()
                    if errors:
                        print("transport errors: " + "; ".join(f"{n}× {m}" for m, n in errors.items()))
                print(f"verdict: {r.verdict()}", flush=True)
        finally:  # whatever ended the runs, the table of those that ran is printed
            took = time.monotonic() - began
            print("\n" + "\n".join(table(results)) + f"\n\n({len(results)} of {len(points)} points in {took:.0f} s)\n",
                  flush=True)  # fmt: skip
    lines = [
        common.target(f"front killed {r.point}: SSH back within {SSH_BACK_TARGET:g} s",
                      r.status is not None and r.status <= SSH_BACK_TARGET,
                      f"status {seconds(r.status)} s, banner {seconds(r.banner)} s"
                      f" (ssh status on the healthy front {seconds(r.status_before)} s)")  # fmt: skip
        for r in results
    ]
    data: dict[str, Any] = {
        "rate": args.rate, "keepalive": args.keepalive, "min_requests": args.requests,
        "points": [
            {"point": r.point, "sent": r.report.sent if r.report else None,
             "failed": r.report.failed if r.report else None, "refused": r.report.refused if r.report else None,
             "errors": r.report.errors() if r.report else {},
             "phases": [{"name": p.name, "seconds": p.duration, "sent": p.sent, "failed": p.failed,
                         "p50": p.p50, "p99": p.p99} for p in (r.report.phases if r.report else ())],
             "ssh_back_banner": r.banner, "ssh_back_status": r.status, "status_before": r.status_before,
             "supervisor_kept": r.supervisor_kept, "app": r.app, "stage_before": r.stage_before, "stage": r.stage,
             "upload_status": r.upload_status, "ok": r.ok, "problems": r.problems}
            for r in results
        ],
        "summary": lines,
    }  # fmt: skip
    common.save_results("front_kill_quick" if args.quick else "front_kill", data)
    failed = [r for r in results if not r.ok]
    if failed or len(results) < len(points):
        print(f"front_kill: {len(failed)} of {len(points)} points FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=">= 1 000 requests per point instead of 5 000")
    parser.add_argument("--requests", type=int, default=5000, help="at least this many requests per point")
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, of {', '.join(POINTS)}")
    parser.add_argument("--rate", type=float, default=210.0,
                        help="requests per second offered (default 210: hey's ticker lands a little under)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--keepalive", action="store_true",
                        help="hey with keep-alive (default: a new connection per request)")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the kill (or the upload)")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"front_kill: {e}")
