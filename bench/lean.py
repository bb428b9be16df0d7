"""A lean device (issue 13): what ``sshfwup serve`` costs before it serves anything.

1. **Imports**: ``python -X importtime`` of what serve loads (the same statement as
   tests/test_imports.py), median of N fresh interpreters, per top module; the interpreter's own
   start (``python -c pass``) measured in the same run as the baseline.
2. **Start → READY=1**: a simulated device booted without an application (``[app] command``
   empty: app readiness excluded), then ``sshfwup serve`` started N times on its configuration
   (another port) with the bench's own ``NOTIFY_SOCKET``: spawn → the ``READY=1`` datagram. This
   is the whole device start-up path: config, host key, journal, the boot env read through
   ``fw_printenv``, recovery, the SSH listener. Also spawn → the SSH front's "listening on" line.
3. **Idle memory** of each of those servers 1 s after READY=1 (and after its SSH front listens):
   RSS, PSS and USS (/proc/PID/smaps_rollup) of each process of the two-process design — the
   supervisor (serve itself: the app, no asyncssh), the SSH front (its child, ``serve --front``)
   and their sum — beside the old one-process design (``--baseline-ref``, default f8665f7: a
   temporary git worktree of that commit, its serve started the same way with ``PYTHONPATH`` on
   it; removed at the end). Table: medians over the runs.

Targets (this machine only): READY=1 ≤ 0.4 s; the supervisor, the process that lives all the
time, idle RSS ≤ 32 MiB (the old whole-serve target), ≤ 20 MiB, and PSS ≤ 16 MiB. A missed target
or a design that could not be measured is a row saying so and makes the exit status 1.

``--slow-cpu`` repeats 1–3 with everything confined to one core at 20 % (taskset + a cgroup CPU
quota): the nearest thing to a board here.

    .venv/bin/python bench/lean.py [--quick] [--slow-cpu] [--runs N] [--server-command JSON]
                                   [--baseline-ref REF|none]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError, MemoryFigures, SlowCpu

from sshfwup.sim.host import free_port
from sshfwup.system import procs
from sshfwup.sim.toml_write import dumps as toml_dumps

sys.path.insert(0, str(common.REPO / "tests"))
from test_imports import SERVE_IMPORTS  # noqa: E402 - one statement for the test and the bench

READY_TARGET_S = 0.4
ALL = "(all of serve's imports)"
IDLE_RSS_TARGET_MIB = 32  # applied to the supervisor: the process that lives all the time
SUPERVISOR_RSS_TARGET_MIB = 20
SUPERVISOR_PSS_TARGET_MIB = 16
BASELINE_REF = "f8665f7"  # the last one-process design
FRONT_WAIT_S = 10.0  # the front starts right after the supervisor binds
FRONT_LISTEN_WAIT_S = 60.0  # its imports (asyncssh) until "listening on"; long under --slow-cpu
_FRONT_LISTENING = "sshfwup.ssh.server: listening on"  # the front's line once it serves, relayed by serve
_INTERRUPTED = threading.Event()  # Ctrl-C: stop measuring, tear everything down, exit 130
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
# modules whose cumulative import time is printed (when imported at all), besides the top level
WATCHED = ("asyncio", "ssl", "anyio", "cryptography", "cryptography.x509", "asyncssh", "asyncssh.crypto.pq",
           "asyncssh.sftp", "asyncssh.agent", "sshfwup.config", "sshfwup.ssh.server", "sshfwup.update.pipeline",
           "sshfwup.supervisor.supervisor", "sshfwup.device")  # fmt: skip


@dataclass(frozen=True)
class StartSample:
    ready_s: float
    rss: float  # the serve process: the supervisor (new), the one process (old)
    pss: float
    uss: float
    front_s: float | None = None  # spawn → the front's "listening on" line (None: not seen, or no front)
    front_rss: float | None = None  # the SSH front (new design only)
    front_pss: float | None = None
    front_uss: float | None = None


@dataclass(frozen=True)
class Design:
    """What is started: its argv ({config} replaced), extra environment, working directory, and
    whether it has an SSH front to find."""

    name: str
    command: list[str]
    env: Mapping[str, str]
    cwd: Path | None
    front: bool


def _on_sigint(signum: int, frame: object) -> None:
    _INTERRUPTED.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
    print("lean: interrupted; cleaning up (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


def _check_interrupt() -> None:
    if _INTERRUPTED.is_set():
        raise BenchError("interrupted")


def _wrap(argv: list[str], slow: SlowCpu | None) -> list[str]:
    return slow.wrap(argv) if slow is not None else argv


def measure_imports(runs: int, slow: SlowCpu | None) -> tuple[dict[str, float], float, float]:
    """(module → median cumulative import ms, median wall s of the import statement's
    interpreter, median wall s of ``python -c pass``)."""
    per_module: dict[str, list[float]] = defaultdict(list)
    walls, bare = [], []
    for _ in range(runs):
        _check_interrupt()
        started = time.monotonic()
        try:
            subprocess.run(_wrap([sys.executable, "-c", "pass"], slow), check=True)
            bare.append(time.monotonic() - started)
            started = time.monotonic()
            result = subprocess.run(_wrap([sys.executable, "-X", "importtime", "-c", SERVE_IMPORTS], slow),
                                    capture_output=True, text=True, check=True)  # fmt: skip
        except subprocess.CalledProcessError as e:
            _check_interrupt()
            raise BenchError(f"{e}: {(e.stderr or '').strip()[-500:]}") from e
        walls.append(time.monotonic() - started)
        top = 0.0
        for line in result.stderr.splitlines():
            m = _IMPORT_LINE.match(line)
            if not m:
                continue
            name, cumulative_ms, depth = m.group(4), int(m.group(2)) / 1000, len(m.group(3))
            if depth == 1 or name in WATCHED:
                per_module[name].append(cumulative_ms)
            if depth == 1:
                top += cumulative_ms
        per_module[ALL].append(top)
    return {name: common.median(v) for name, v in per_module.items()}, common.median(walls), common.median(bare)


class _Notify:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))

    def drain(self) -> None:
        """Forget datagrams a previous server sent (its STOPPING=1)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.sock.recv(4096)
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            _check_interrupt()
            if left <= 0:
                raise BenchError(f"sshfwup serve sent no READY=1 within {timeout:g} s")
            if process.poll() is not None:
                raise BenchError(f"sshfwup serve exited with status {process.returncode} before READY=1")
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if "READY=1" in data.decode(errors="replace").splitlines():
                return time.monotonic()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def find_front(pid: int) -> int | None:
    """The SSH front: the child of the supervisor ``pid`` whose command line has ``--front``."""
    return procs.ssh_front(pid)


def _wait_front(process: subprocess.Popen[bytes], log: Path, offset: int, started: float
                ) -> tuple[int, float | None]:  # fmt: skip
    """(the front's pid, spawn → its "listening on" line in serve's log, None if not seen within
    FRONT_LISTEN_WAIT_S: it is measured all the same)."""
    deadline = time.monotonic() + FRONT_WAIT_S
    while (front := find_front(process.pid)) is None:
        _check_interrupt()
        if process.poll() is not None:
            raise BenchError(f"sshfwup serve exited with status {process.returncode} before its SSH front started")
        if time.monotonic() > deadline:
            raise BenchError(f"no SSH front (a child with --front) of serve (pid {process.pid}) "
                             f"within {FRONT_WAIT_S:g} s of READY=1")  # fmt: skip
        time.sleep(0.02)
    deadline = time.monotonic() + FRONT_LISTEN_WAIT_S
    while time.monotonic() < deadline:
        _check_interrupt()
        with open(log, "rb") as f:
            f.seek(offset)
            if _FRONT_LISTENING.encode() in f.read():
                return front, time.monotonic() - started
        if process.poll() is not None:
            raise BenchError(f"sshfwup serve exited with status {process.returncode} before its SSH front listened")
        time.sleep(0.02)
    return front, None


def _memory(pid: int, what: str, process: subprocess.Popen[bytes]) -> MemoryFigures:
    try:
        return common.memory_figures(pid)
    except OSError as e:
        status = process.poll()
        why = f"serve exited with status {status}" if status is not None else str(e)
        raise BenchError(f"{what} (pid {pid}) was gone when measured: {why}") from e


def measure_starts(config: Path, runs: int, slow: SlowCpu | None, design: Design, work: Path) -> list[StartSample]:
    notify = _Notify(work / "bench.notify")
    log = work / f"serve-{design.name}.log"
    log.touch()
    samples = []
    try:
        for _ in range(runs):
            _check_interrupt()
            notify.drain()
            env = dict(os.environ, NOTIFY_SOCKET=str(notify.path)) | dict(design.env)
            argv = [arg.replace("{config}", str(config)) for arg in design.command]
            offset = log.stat().st_size
            started = time.monotonic()
            with open(log, "ab") as stderr:
                process = subprocess.Popen(_wrap(argv, slow), env=env, cwd=design.cwd, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
            try:
                ready = notify.wait_ready(process, timeout=60)
                front, front_s = _wait_front(process, log, offset, started) if design.front else (None, None)
                time.sleep(1.0)  # idle: whatever start-up left behind has settled
                _check_interrupt()
                mem = _memory(process.pid, "sshfwup serve", process)  # --slow-cpu's wrapper execs serve: same pid
                fmem = _memory(front, "its SSH front", process) if front is not None else None
                samples.append(StartSample(ready - started, mem.rss, mem.pss, mem.uss, front_s,
                                           *((fmem.rss, fmem.pss, fmem.uss) if fmem else ())))  # fmt: skip
            finally:
                _stop(process)
    finally:
        notify.close()
    return samples


def banner_seconds(port: int, timeout: float = 30.0) -> float:
    """Connect → the server's ``SSH-2.0-`` line: what a client waits before SSH begins."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(256)
            if not chunk:
                raise BenchError(f"port {port} closed before the SSH banner")
            data += chunk
    if not data.startswith(b"SSH-2.0-"):
        raise BenchError(f"port {port} answered {data[:40]!r}, not an SSH banner")
    return time.monotonic() - started


def measure_lazy(config: Path, runs: int, slow: SlowCpu | None, work: Path) -> list[tuple[float, float]]:
    """[server] front_idle_exit = 1: once the front has left, the first connection's wait for the
    SSH banner (the supervisor starts a front for it), then a second connection's (a front runs)."""
    raw = tomllib.loads(config.read_text())
    raw.setdefault("server", {})["front_idle_exit"] = 1
    port = int(raw["server"]["port"])
    lazy = work / "bench-serve-lazy.toml"
    lazy.write_text(toml_dumps(raw))
    notify = _Notify(work / "bench-lazy.notify")
    samples = []
    try:
        for _ in range(runs):
            _check_interrupt()
            notify.drain()
            env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
            argv = [sys.executable, "-m", "sshfwup", "serve", "--config", str(lazy)]
            with open(work / "serve-lazy.log", "ab") as stderr:
                process = subprocess.Popen(_wrap(argv, slow), env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
            try:
                notify.wait_ready(process, timeout=60)
                deadline = time.monotonic() + 60
                seen = False
                while True:  # the front starts, then leaves after 1 s without connections
                    _check_interrupt()
                    front = find_front(process.pid)
                    seen = seen or front is not None
                    if seen and front is None:
                        break
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise BenchError("the lazy front did not start and leave within 60 s")
                    time.sleep(0.05)
                cold = banner_seconds(port)
                warm = banner_seconds(port)
                samples.append((cold, warm))
            finally:
                _stop(process)
    finally:
        notify.close()
    return samples


def second_config(sim: common.SimRun, work: Path) -> Path:
    """The device's configuration with another SSH port: a second serve beside the booted one."""
    raw = tomllib.loads(sim.device.config_path.read_text())
    raw.setdefault("server", {})["port"] = free_port()
    path = work / "bench-serve.toml"
    path.write_text(toml_dumps(raw))
    return path


# --- the old design: a worktree of --baseline-ref ------------------------------------------------


@contextmanager
def baseline_worktree(ref: str) -> Iterator[Path | str]:
    """A temporary detached git worktree of ``ref`` (or why there is none); removed at exit, also
    on errors and Ctrl-C."""
    path = Path(tempfile.mkdtemp(prefix="lean-baseline-"))
    added = False
    try:
        result = subprocess.run(["git", "-C", str(common.REPO), "worktree", "add", "--detach", str(path), ref],
                                capture_output=True, text=True)  # fmt: skip
        added = result.returncode == 0
        yield path if added else f"git worktree add {ref}: {result.stderr.strip()}"
    finally:
        if added:
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "remove", "--force", str(path)],
                           capture_output=True)  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)
        if added:
            subprocess.run(["git", "-C", str(common.REPO), "worktree", "prune"], capture_output=True)


def baseline_design(worktree: Path, ref: str) -> Design:
    env = {"PYTHONPATH": str(worktree)}
    probe = subprocess.run([sys.executable, "-c", "import sshfwup; print(sshfwup.__file__)"], cwd=worktree,
                           env=dict(os.environ) | env, capture_output=True, text=True)  # fmt: skip
    where = probe.stdout.strip()
    if probe.returncode != 0 or not Path(where).resolve().is_relative_to(worktree.resolve()):
        raise BenchError(f"the worktree of {ref} does not import its own sshfwup (got {where or probe.stderr.strip()})")
    return Design(f"old-{ref}", [sys.executable, "-m", "sshfwup", "serve", "--config", "{config}"], env, worktree,
                  front=False)  # fmt: skip


# --- the report ---------------------------------------------------------------------------------


def _med(samples: list[StartSample], field: str) -> float:
    return common.median([getattr(s, field) for s in samples])


def _row(design: str, process: str, rss: float, pss: float, uss: float, width: int) -> str:
    return f"  {design:<{width}} {process:<22} {rss:8.1f} {pss:8.1f} {uss:8.1f}"


def report(label: str, imports: dict[str, float], import_wall: float, bare: float,
           new: list[StartSample] | str, old: list[StartSample] | str | None, ref: str,
           ) -> tuple[list[str], list[tuple[str, bool, str]], list[str]]:  # fmt: skip
    """(lines, targets, failures). ``new``/``old``: the samples, or why they could not be taken;
    ``old`` None: no baseline asked for."""
    lines = [f"{label}:",
             f"  python -c pass {bare * 1000:6.0f} ms; python importing what serve imports {import_wall * 1000:6.0f} ms "
             f"(imports alone {imports[ALL]:.0f} ms)",
             "  import time, cumulative ms (median):"]  # fmt: skip
    for name, ms in sorted(imports.items(), key=lambda kv: -kv[1]):
        if name != ALL and ms >= 1.0:
            lines.append(f"    {ms:7.1f}  {name}")
    failures: list[str] = []
    old_name = f"old ({ref})"
    w = max(len("design"), len(old_name)) + 1
    for name, samples in (("new", new), (old_name, old)):
        if isinstance(samples, list):
            ready = _med(samples, "ready_s")
            lines.append(f"  {name}: start → READY=1: runs {' '.join(f'{s.ready_s:.3f}' for s in samples)} s, "
                         f"median {ready:.3f} s = {ready / bare:.1f}x python -c pass")  # fmt: skip
    if isinstance(new, list):
        fronts = [s.front_s for s in new if s.front_s is not None]
        if fronts:
            lines.append(f"  new: start → SSH front listening: runs {' '.join(f'{t:.3f}' for t in fronts)} s, "
                         f"median {common.median(fronts):.3f} s")  # fmt: skip
        if len(fronts) < len(new):
            lines.append(f"  new: {len(new) - len(fronts)} of {len(new)} fronts did not log '{_FRONT_LISTENING}' "
                         f"within {FRONT_LISTEN_WAIT_S:g} s; measured all the same")  # fmt: skip
    runs = len(new) if isinstance(new, list) else len(old) if isinstance(old, list) else 0
    lines += [f"  idle memory 1 s after READY=1 and the front listening, MiB (medians of {runs} run{'s' * (runs != 1)}):",
              f"  {'design':<{w}} {'process':<22} {'RSS MiB':>8} {'PSS MiB':>8} {'USS MiB':>8}"]  # fmt: skip
    if isinstance(old, list):
        lines.append(_row(old_name, "one process", _med(old, "rss"), _med(old, "pss"), _med(old, "uss"), w))
    elif isinstance(old, str):
        lines.append(f"  {old_name:<{w}} {'one process':<22} FAILED: {old}")
        failures.append(f"{label}: {old_name}: {old}")
    if isinstance(new, list):
        lines.append(_row("new", "supervisor", _med(new, "rss"), _med(new, "pss"), _med(new, "uss"), w))
        lines.append(_row("new", "SSH front", _med(new, "front_rss"), _med(new, "front_pss"), _med(new, "front_uss"), w))
        totals = [(s.rss + s.front_rss, s.pss + s.front_pss, s.uss + s.front_uss) for s in new  # type: ignore[operator]
                  if s.front_rss is not None and s.front_pss is not None and s.front_uss is not None]  # fmt: skip
        lines.append(_row("new", "total (both)", *(common.median([t[i] for t in totals]) for i in range(3)), w))
    else:
        lines.append(f"  {'new':<{w}} {'supervisor + SSH front':<22} FAILED: {new}")
        failures.append(f"{label}: new: {new}")
    if label != "this machine":  # no absolute target on the throttled CPU: the figures are what a board would see
        return lines, [], failures
    lines.append(f"  targets: supervisor idle RSS <= {SUPERVISOR_RSS_TARGET_MIB} MiB and PSS <= "
                 f"{SUPERVISOR_PSS_TARGET_MIB} MiB; the {IDLE_RSS_TARGET_MIB} MiB idle RSS target (once the whole "
                 f"serve's) applies to the supervisor, the process that lives all the time")  # fmt: skip
    names = (f"serve start -> READY=1 <= {READY_TARGET_S} s",
             f"serve idle RSS <= {IDLE_RSS_TARGET_MIB} MiB (the supervisor, the process that lives all the time)",
             f"supervisor idle RSS <= {SUPERVISOR_RSS_TARGET_MIB} MiB",
             f"supervisor idle PSS <= {SUPERVISOR_PSS_TARGET_MIB} MiB")  # fmt: skip
    if not isinstance(new, list):
        return lines, [(name, False, "not measured: the new design failed") for name in names], failures
    ready, rss, pss, uss = (_med(new, f) for f in ("ready_s", "rss", "pss", "uss"))
    detail = f"supervisor RSS {rss:.1f} MiB, PSS {pss:.1f}, USS {uss:.1f}"
    targets = [
        (names[0], ready <= READY_TARGET_S, f"median {ready:.3f} s"),
        (names[1], rss <= IDLE_RSS_TARGET_MIB, detail),
        (names[2], rss <= SUPERVISOR_RSS_TARGET_MIB, detail),
        (names[3], pss <= SUPERVISOR_PSS_TARGET_MIB, detail),
    ]
    return lines, targets, failures


async def _measure(config: Path, runs: int, slow: SlowCpu | None, design: Design, work: Path
                   ) -> list[StartSample] | str:  # fmt: skip
    try:
        return await anyio.to_thread.run_sync(measure_starts, config, runs, slow, design, work)
    except (BenchError, OSError) as e:
        return str(e) or type(e).__name__


async def main(args: argparse.Namespace, worktree: Path | str | None) -> int:
    """``worktree``: the old design's (or why there is none); None with --baseline-ref none."""
    runs = args.runs or (3 if args.quick else 7)
    command = json.loads(args.server_command) if args.server_command else [
        sys.executable, "-m", "sshfwup", "serve", "--config", "{config}"]  # fmt: skip
    new_design = Design("new", command, {}, None, front=True)
    ref = args.baseline_ref
    old_design: Design | str | None = None  # None: no baseline; str: why not
    if ref != "none":
        try:
            if not isinstance(worktree, Path):
                raise BenchError(worktree or "no worktree")
            old_design = baseline_design(worktree, ref)
        except BenchError as e:
            old_design = str(e)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {runs} runs each; serve: {command}; "
          f"old design: {ref if ref != 'none' else 'not measured'}", flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    all_lines: list[str] = []
    targets: list[tuple[str, bool, str]] = []
    failures: list[str] = []
    with common.workdir("lean") as work:
        key = common.make_key(work / "uploader")
        firmware = common.sample_firmware(work, "1.0.0")
        async with common.sim_device(work, key, firmware, overrides={"app": {"command": []}}) as sim:  # no app
            config = second_config(sim, work)
            cases: list[tuple[str, SlowCpu | None]] = [("this machine", None)]
            if args.slow_cpu:
                cases.append(("slow CPU", SlowCpu(args.cpu_percent)))
            for label, slow in cases:
                if slow is not None:
                    slow.__enter__()
                try:
                    if slow is not None:
                        label = f"slow CPU: {slow.describe()}"
                    imports, wall, bare = await anyio.to_thread.run_sync(measure_imports, runs, slow)
                    new = await _measure(config, runs, slow, new_design, work)
                    try:
                        lazy: list[tuple[float, float]] | str = await anyio.to_thread.run_sync(
                            measure_lazy, config, runs, slow, work)  # fmt: skip
                    except (BenchError, OSError) as e:
                        lazy = str(e) or type(e).__name__
                    old = (await _measure(config, runs, slow, old_design, work)
                           if isinstance(old_design, Design) else old_design)  # fmt: skip
                finally:
                    if slow is not None:
                        slow.__exit__()
                lines, case_targets, case_failures = report(label, imports, wall, bare, new, old, ref)
                if isinstance(lazy, list):
                    cold, warm = (common.median([s[i] for s in lazy]) for i in (0, 1))
                    lines.append(f"  lazy front ([server] front_idle_exit = 1): the first connection waits {cold:.3f} s "
                                 f"for the SSH banner (runs {' '.join(f'{s[0]:.3f}' for s in lazy)}), the next one "
                                 f"{warm:.3f} s (a front runs): the first connection costs {cold - warm:.3f} s")  # fmt: skip
                else:
                    lines.append(f"  lazy front: FAILED: {lazy}")
                    case_failures.append(f"{label}: lazy front: {lazy}")
                print("\n".join(lines), flush=True)
                all_lines += lines
                targets += case_targets
                failures += case_failures
                results[label] = {"imports_ms": imports, "import_wall_s": wall, "python_pass_s": bare,
                                  "starts": [asdict(s) for s in new] if isinstance(new, list) else new,
                                  "lazy_first_connection_s": lazy,
                                  f"old_{ref}": [asdict(s) for s in old] if isinstance(old, list) else old}  # fmt: skip
                if _INTERRUPTED.is_set():
                    break
    print(f"(load average now {os.getloadavg()[0]:.2f})")
    all_lines += [common.target(*t) for t in targets]
    for failure in failures:
        line = f"failed  {failure}"
        print(line, flush=True)
        all_lines.append(line)
    common.save_results("lean_quick" if args.quick else "lean", results | {"summary": all_lines})
    if _INTERRUPTED.is_set():
        return 130
    return 1 if failures or not all(met for _, met, _ in targets) else 0


def _run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, _on_sigint)
    if args.baseline_ref == "none":
        return anyio.run(main, args, None)
    with baseline_worktree(args.baseline_ref) as worktree:
        return anyio.run(main, args, worktree)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 7")
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--slow-cpu", action="store_true", help="also on one core throttled to --cpu-percent")
    parser.add_argument("--cpu-percent", type=float, default=20.0)
    parser.add_argument("--server-command", help="JSON argv instead of sshfwup serve (the new design); {config} is replaced")
    parser.add_argument("--baseline-ref", default=BASELINE_REF, metavar="REF",
                        help=f"the one-process design measured beside (a git worktree of REF; default {BASELINE_REF}, "
                             f"'none' to skip)")  # fmt: skip
    try:
        sys.exit(_run(parser.parse_args()))
    except BenchError as e:
        sys.exit(130 if _INTERRUPTED.is_set() else f"lean: {e}")
