"""A lean device (issue 13): what ``sshfwup serve`` costs before it serves anything.

1. **Imports**: ``python -X importtime`` of what serve loads (the same statement as
   tests/test_imports.py), median of N fresh interpreters, per top module; the interpreter's own
   start (``python -c pass``) measured in the same run as the baseline.
2. **Start → READY=1**: a simulated device booted without an application (``[app] command``
   empty: app readiness excluded), then ``sshfwup serve`` started N times on its configuration
   (another port) with the bench's own ``NOTIFY_SOCKET``: spawn → the ``READY=1`` datagram. This
   is the whole device start-up path: config, host key, journal, the boot env read through
   ``fw_printenv``, recovery, the SSH listener.
3. **Idle memory** of each of those servers 1 s after READY=1: RSS, PSS and USS
   (/proc/PID/smaps_rollup).

``--slow-cpu`` repeats 1–3 with everything confined to one core at 20 % (taskset + a cgroup CPU
quota): the nearest thing to a board here.

    .venv/bin/python bench/lean.py [--quick] [--slow-cpu] [--runs N] [--server-command JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError, SlowCpu

from sshfwup.sim.host import free_port
from sshfwup.sim.toml_write import dumps as toml_dumps

sys.path.insert(0, str(common.REPO / "tests"))
from test_imports import SERVE_IMPORTS  # noqa: E402 - one statement for the test and the bench

READY_TARGET_S = 0.4
ALL = "(all of serve's imports)"
IDLE_RSS_TARGET_MIB = 32
_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")
# modules whose cumulative import time is printed (when imported at all), besides the top level
WATCHED = ("asyncio", "ssl", "anyio", "cryptography", "cryptography.x509", "asyncssh", "asyncssh.crypto.pq",
           "asyncssh.sftp", "asyncssh.agent", "sshfwup.config", "sshfwup.ssh.server", "sshfwup.update.pipeline",
           "sshfwup.supervisor.supervisor", "sshfwup.device")  # fmt: skip


@dataclass(frozen=True)
class StartSample:
    ready_s: float
    rss: float
    pss: float
    uss: float


def _wrap(argv: list[str], slow: SlowCpu | None) -> list[str]:
    return slow.wrap(argv) if slow is not None else argv


def measure_imports(runs: int, slow: SlowCpu | None) -> tuple[dict[str, float], float, float]:
    """(module → median cumulative import ms, median wall s of the import statement's
    interpreter, median wall s of ``python -c pass``)."""
    per_module: dict[str, list[float]] = defaultdict(list)
    walls, bare = [], []
    for _ in range(runs):
        started = time.monotonic()
        subprocess.run(_wrap([sys.executable, "-c", "pass"], slow), check=True)
        bare.append(time.monotonic() - started)
        started = time.monotonic()
        result = subprocess.run(_wrap([sys.executable, "-X", "importtime", "-c", SERVE_IMPORTS], slow),
                                capture_output=True, text=True, check=True)  # fmt: skip
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

    def wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
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


def measure_starts(config: Path, runs: int, slow: SlowCpu | None, command: list[str], work: Path) -> list[StartSample]:
    notify = _Notify(work / "bench.notify")
    samples = []
    try:
        for _ in range(runs):
            env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
            argv = [arg.replace("{config}", str(config)) for arg in command]
            started = time.monotonic()
            process = subprocess.Popen(_wrap(argv, slow), env=env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "ab"))  # noqa: SIM115  # fmt: skip
            try:
                ready = notify.wait_ready(process, timeout=60)
                time.sleep(1.0)  # idle: whatever start-up left behind has settled
                mem = common.memory_figures(process.pid)  # under --slow-cpu the wrapper execs serve: same pid
                samples.append(StartSample(ready - started, mem.rss, mem.pss, mem.uss))
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


def report(label: str, imports: dict[str, float], import_wall: float, bare: float,
           starts: list[StartSample]) -> tuple[list[str], list[tuple[str, bool, str]]]:  # fmt: skip
    lines = [f"{label}:",
             f"  python -c pass {bare * 1000:6.0f} ms; python importing what serve imports {import_wall * 1000:6.0f} ms "
             f"(imports alone {imports[ALL]:.0f} ms)",
             "  import time, cumulative ms (median):"]  # fmt: skip
    for name, ms in sorted(imports.items(), key=lambda kv: -kv[1]):
        if name != ALL and ms >= 1.0:
            lines.append(f"    {ms:7.1f}  {name}")
    ready = common.median([s.ready_s for s in starts])
    rss = common.median([s.rss for s in starts])
    pss = common.median([s.pss for s in starts])
    uss = common.median([s.uss for s in starts])
    lines.append(f"  start → READY=1: runs {' '.join(f'{s.ready_s:.3f}' for s in starts)} s, median {ready:.3f} s "
                 f"= {ready / bare:.1f}x python -c pass")  # fmt: skip
    lines.append(f"  idle 1 s after READY=1: RSS {rss:.1f} MiB, PSS {pss:.1f} MiB, USS {uss:.1f} MiB (medians)")
    suffix = "" if label == "this machine" else f" ({label})"
    targets = [
        (f"serve start -> READY=1 <= {READY_TARGET_S} s{suffix}", ready <= READY_TARGET_S, f"median {ready:.3f} s"),
        (f"serve idle RSS <= {IDLE_RSS_TARGET_MIB} MiB{suffix}", rss <= IDLE_RSS_TARGET_MIB,
         f"RSS {rss:.1f} MiB, PSS {pss:.1f}, USS {uss:.1f}"),
    ]  # fmt: skip
    if suffix:  # no absolute target on the throttled CPU: the figures are what a board would see
        targets = []
    return lines, targets


async def main(args: argparse.Namespace) -> int:
    runs = args.runs or (3 if args.quick else 7)
    command = json.loads(args.server_command) if args.server_command else [
        sys.executable, "-m", "sshfwup", "serve", "--config", "{config}"]  # fmt: skip
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {runs} runs each; serve: {command}",
          flush=True)  # fmt: skip
    results: dict[str, Any] = {}
    all_lines: list[str] = []
    targets: list[tuple[str, bool, str]] = []
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
                    starts = await anyio.to_thread.run_sync(measure_starts, config, runs, slow, command, work)
                finally:
                    if slow is not None:
                        slow.__exit__()
                lines, case_targets = report(label, imports, wall, bare, starts)
                print("\n".join(lines), flush=True)
                all_lines += lines
                targets += case_targets
                results[label] = {"imports_ms": imports, "import_wall_s": wall, "python_pass_s": bare,
                                  "starts": [asdict(s) for s in starts]}  # fmt: skip
    print(f"(load average now {os.getloadavg()[0]:.2f})")
    all_lines += [common.target(*t) for t in targets]
    common.save_results("lean_quick" if args.quick else "lean", results | {"summary": all_lines})
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs instead of 7")
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--slow-cpu", action="store_true", help="also on one core throttled to --cpu-percent")
    parser.add_argument("--cpu-percent", type=float, default=20.0)
    parser.add_argument("--server-command", help="JSON argv instead of sshfwup serve; {config} is replaced")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"lean: {e}")
