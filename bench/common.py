"""Shared helpers for the benchmarks in bench/: keys, payloads, /proc figures, OpenSSH's sshd as a
baseline, a simulated device running ``sshfwup serve``, and uploads with the real ``ssh -s``.

The benchmarks print figures; they never assert on timing. Run them as scripts
(``.venv/bin/python bench/throughput.py``); see bench/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(REPO))

from sshfwup.sim.device import SimDevice, cleanup  # noqa: E402
from sshfwup.sim.host import KeyPair, free_port, ssh_keygen, zip_payload
from sshfwup.sim.layout import DEFAULT_LAYOUT, Layout  # noqa: E402
from sshfwup.sim.machine import SimMachine  # noqa: E402
from sshfwup.sim.rootfs import build_sample_firmware  # noqa: E402

SINK = BENCH / "discard_fwup.py"
RESULTS = BENCH / "results"
MiB = 1 << 20
GiB = 1 << 30
MB = 1e6
CLK_TCK = os.sysconf("SC_CLK_TCK")

SSH_OPTIONS = (
    "-F", "none",  # no user or system ssh_config (GSSAPI attempts, SendEnv...) in the figures
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
)  # fmt: skip


class BenchError(Exception):
    """A benchmark could not set up or run what it measures."""


# --- small things ------------------------------------------------------------------------------


def make_key(path: Path) -> KeyPair:
    return ssh_keygen(path)


def make_payload(path: Path, size: int) -> Path:
    """About ``size`` bytes of incompressible data in a zip archive (the server refuses an upload
    that does not start and end like a ``.fw``): the upload's content."""
    return zip_payload(path, size)


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"sshfwup-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def size_label(size: int) -> str:
    return f"{size // GiB} GiB" if size % GiB == 0 else f"{size // MiB} MiB"


def save_results(name: str, data: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def target(name: str, met: bool, detail: str) -> str:
    """One ``target`` line; run_all.sh collects them into its summary."""
    line = f"target  {'MET ' if met else 'MISS'}  {name}: {detail}"
    print(line, flush=True)
    return line


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- /proc -------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # "pid (comm) S ppid ..." — comm may contain spaces: split after the last ")"; index 0 = field 3
    return stat[stat.rindex(b")") + 2 :].decode().split()


@dataclass(frozen=True)
class CpuTimes:
    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.user - other.user, self.system - other.system)


def cpu_times(pid: int) -> CpuTimes:
    """utime and stime of the process itself (all its threads), in seconds."""
    f = _stat_fields(pid)
    return CpuTimes(int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK)


def reaped_children_cpu_times(pid: int) -> CpuTimes:
    """cutime and cstime: CPU of the children this process has waited for (theirs included)."""
    f = _stat_fields(pid)
    return CpuTimes(int(f[13]) / CLK_TCK, int(f[14]) / CLK_TCK)


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, e.g. VmRSS or VmHWM (peak RSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


@dataclass(frozen=True)
class MemoryFigures:
    """/proc/PID/smaps_rollup in MiB: RSS counts shared library pages in full; PSS divides each
    shared page among the processes mapping it; USS (private clean + dirty) is what the process
    alone holds — on a board, where no other Python shares the libraries, RSS is the honest one."""

    rss: float
    pss: float
    uss: float


def memory_figures(pid: int) -> MemoryFigures:
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                fields[name] = int(rest.split()[0])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return MemoryFigures(fields["Rss"] / 1024, fields["Pss"] / 1024, uss / 1024)


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux ≥ 4.0, root)."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


# --- uploads with OpenSSH's client -----------------------------------------------------------


@dataclass(frozen=True)
class SinkReport:
    """What bench/discard_fwup.py wrote at exit (see its docstring)."""

    payload_bytes: int
    first_byte_at: float | None
    ended_at: float
    cpu: CpuTimes  # the sink's own, its exec'ing shell or shim and their children included
    status: str

    @property
    def data_seconds(self) -> float:
        return self.ended_at - (self.first_byte_at or self.ended_at)


def read_sink_report(path: Path, timeout: float = 10.0) -> SinkReport:
    wait_for(path.exists, timeout, f"the sink's report {path}")
    raw = json.loads(path.read_text())
    path.unlink()
    return SinkReport(
        payload_bytes=raw["payload_bytes"],
        first_byte_at=raw["first_byte_at"],
        ended_at=raw["ended_at"],
        cpu=CpuTimes(raw["cpu_user"], raw["cpu_system"]),
        status=raw["status"],
    )


def ssh_argv(port: int, key: KeyPair, *, cipher: str | None = None, user: str = "root") -> list[str]:
    """``ssh -s HOST fwup``, as Nerves' upload.sh runs it."""
    cipher_opts = ["-c", cipher] if cipher else []
    return ["ssh", *SSH_OPTIONS, "-i", str(key.private), "-p", str(port), *cipher_opts, "-s", f"{user}@127.0.0.1", "fwup"]


@dataclass(frozen=True)
class UploadResult:
    returncode: int
    started: float  # time.monotonic()
    ended: float
    stdout: str
    stderr: str
    lines: tuple[tuple[float, str], ...]  # (arrival time, line) of stdout, \r and \n both end a line

    @property
    def seconds(self) -> float:
        return self.ended - self.started

    def first_line_at(self, predicate: Callable[[str], bool]) -> tuple[float, str] | None:
        for at, line in self.lines:
            if predicate(line):
                return at, line
        return None


def _clean(line: str) -> str:
    return line.replace("\x1b[K", "").strip()


async def upload(
    argv: Sequence[str], payload: Path, *, on_line: Callable[[float, str], None] | None = None, timeout: float = 600
) -> UploadResult:
    """Run an uploader with ``payload`` on its stdin; timestamp each output line as it arrives."""
    lines: list[tuple[float, str]] = []
    out, err = bytearray(), bytearray()
    pending = ""

    def take(text: str, at: float) -> None:
        nonlocal pending
        pending += text
        while True:
            cut = min((i for i in (pending.find("\n"), pending.find("\r")) if i >= 0), default=-1)
            if cut < 0:
                return
            line, pending = _clean(pending[:cut]), pending[cut + 1 :]
            if line:
                lines.append((at, line))
                if on_line is not None:
                    on_line(at, line)

    with open(payload, "rb") as stdin:
        started = time.monotonic()
        async with await anyio.open_process(list(argv), stdin=stdin) as proc:
            assert proc.stdout is not None and proc.stderr is not None

            async def read_stdout() -> None:
                assert proc.stdout is not None
                async for chunk in proc.stdout:
                    out.extend(chunk)
                    take(chunk.decode("utf-8", errors="replace"), time.monotonic())

            async def read_stderr() -> None:
                assert proc.stderr is not None
                async for chunk in proc.stderr:
                    err.extend(chunk)

            try:
                with anyio.fail_after(timeout):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(read_stdout)
                        tg.start_soon(read_stderr)
                    code = await proc.wait()
            except TimeoutError:
                proc.kill()
                raise BenchError(f"the upload did not finish within {timeout:g} s") from None
        ended = time.monotonic()
    take("\n", ended)
    return UploadResult(
        code, started, ended, out.decode("utf-8", errors="replace"), err.decode("utf-8", errors="replace"), tuple(lines)
    )


# --- the baseline: OpenSSH's sshd ----------------------------------------------------------------

_SSHD_CONFIG = """\
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# the bench's own sshd: no PAM stack, no pid file, no per-user rc, nothing but the subsystem
UsePAM no
PidFile none
PermitUserRC no
UseDNS no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
LogLevel ERROR
# The key files live under /tmp (mode 1777); StrictModes would refuse them for that.
StrictModes no
# sshd runs a subsystem as `$SHELL -c COMMAND`. Debian's bash then sources ~/.bashrc because
# SSH_CLIENT is set, unless it believes it is a nested shell: SHLVL=1 makes it skip the rc file
# (here root's .bashrc runs `pyenv init`, which would dominate a small upload's CPU).
SetEnv SHLVL=1
Subsystem fwup {sink} --raw --sink-report {report}
"""


class Sshd:
    """``/usr/sbin/sshd -D`` on 127.0.0.1 with its own host key and ``Subsystem fwup`` → the raw sink.

    The listener's reaped-children CPU (cutime + cstime) grows by everything a session cost once
    the session's processes are gone; subtract what the sink reports about itself to get sshd's.
    """

    def __init__(self, directory: Path, key: KeyPair, *, sshd: str = "/usr/sbin/sshd", extra_config: str = "") -> None:
        self.dir = directory
        self.key = key
        self.sshd = sshd
        self.extra_config = extra_config  # more sshd_config lines (e.g. MaxStartups)
        self.port = free_port()
        self.report = directory / "sshd-sink.json"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> Sshd:
        if not Path(self.sshd).exists():
            raise BenchError(f"{self.sshd} not found (Debian: apt install openssh-server)")
        host_key = make_key(self.dir / "sshd_host_ed25519_key").private
        authorized = self.dir / "sshd_authorized_keys"
        authorized.write_text(self.key.public_line + "\n")
        config = self.dir / "sshd_config"
        config.write_text(
            _SSHD_CONFIG.format(host_key=host_key, authorized_keys=authorized, sink=SINK, report=self.report)
            + self.extra_config
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        check = subprocess.run([self.sshd, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"sshd refuses the generated config: {check.stderr.strip()}")
        self.process = subprocess.Popen(
            [self.sshd, "-D", "-e", "-f", str(config), "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stderr=open(self.dir / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        try:
            wait_for(self._listening, 10, f"sshd to listen on port {self.port}", interval=0.05)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.dir / "sshd.log").read_text(errors="replace")
            raise BenchError(f"sshd exited with status {self.process.returncode}: {log.strip()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until every per-connection process has exited and been reaped by the listener."""
        wait_for(lambda: not child_pids(self.pid), timeout, "sshd's session processes to exit")

    def __exit__(self, *exc: object) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


# --- the subject: a simulated device running `sshfwup serve` ---------------------------------


@dataclass(frozen=True)
class SimRun:
    device: SimDevice
    machine: SimMachine

    @property
    def server_pid(self) -> int:
        state = self.machine.state()
        if state is None or state.server_pid is None:
            raise BenchError(f"the simulated device has no server running; state {state}")
        return state.server_pid

    @property
    def ssh_port(self) -> int:
        return self.device.ssh_port

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.device.app_port}/"


def sample_firmware(directory: Path, version: str) -> Path:
    return build_sample_firmware(directory / f"fw-{version}", version=version)


@asynccontextmanager
async def sim_device(
    directory: Path, key: KeyPair, firmware: Path, *, overrides: Mapping[str, Any] | None = None,
    layout: Layout = DEFAULT_LAYOUT, name: str = "device", env: Mapping[str, str] | None = None,
) -> AsyncIterator[SimRun]:
    """A simulated device booted from ``firmware`` with ``sshfwup serve`` up; torn down at exit.
    ``layout``: other slot sizes (the firmware must be built for them). ``env``: extra environment
    of the serve process only (a variant measured beside the default in the same run)."""
    path = directory / name
    server_command = None
    if env:  # `env` execs serve: the machine's server pid stays serve's own
        server_command = ["env", *(f"{k}={v}" for k, v in env.items()),
                          sys.executable, "-m", "sshfwup", "serve", "--config", "{config}"]  # fmt: skip
    try:
        device = await anyio.to_thread.run_sync(
            lambda: SimDevice.create(
                path,
                firmware=firmware,
                layout=layout,
                authorized_keys=[key.public_line],
                ssh_port=free_port(),
                app_port=free_port(),
                config_overrides=dict(overrides or {}),
            )
        )
        async with SimMachine.start(device.path, server_command=server_command) as machine:
            await machine.wait_up(timeout=60)
            yield SimRun(device, machine)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(cleanup, path)


def sink_overrides(report: Path, *, rate_mb_s: float = 0.0, expect: int = 0, rate_file: Path | None = None
                   ) -> dict[str, Any]:  # fmt: skip
    """Config overrides that make a simulated device's fwup the framed discard sink, no pipeline.
    ``rate_file``: the sink's rate is read from it at each upload (see discard_fwup.py)."""
    extra = ["--sink-report", str(report)]
    if rate_mb_s:
        extra += ["--sink-rate", f"{rate_mb_s:g}"]
    if rate_file is not None:
        extra += ["--sink-rate-file", str(rate_file)]
    if expect:
        extra += ["--sink-expect", str(expect)]
    return {"fwup": {"path": str(SINK), "success_callback": "", "extra_args": extra}}


# --- a slow link: a throttling TCP proxy on loopback ------------------------------------------------


class _TokenBucket:
    """``rate`` bytes per second, bursts of at most ``burst`` bytes (a link, not a quota)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await anyio.sleep((n - self.tokens) / self.rate)


@asynccontextmanager
async def throttled_proxy(target_port: int, rate: float, *, burst: int = 16 * 1024) -> AsyncIterator[int]:
    """A TCP proxy on 127.0.0.1 in front of ``127.0.0.1:target_port`` that passes at most ``rate``
    bytes per second each way (one shared bucket per direction); yields the proxy's port."""
    up, down = _TokenBucket(rate, burst), _TokenBucket(rate, burst)

    async def pump(src: Any, dst: Any, bucket: _TokenBucket) -> None:
        try:
            while True:
                data = await src.receive(burst)
                await bucket.take(len(data))
                await dst.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            try:
                await dst.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async def handle(client: Any) -> None:
        async with client:
            try:
                server = await anyio.connect_tcp("127.0.0.1", target_port)
            except OSError:
                return
            async with server, anyio.create_task_group() as tg:
                tg.start_soon(pump, client, server, up)
                tg.start_soon(pump, server, client, down)

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


# --- a slower CPU: one core, throttled ----------------------------------------------------------


class SlowCpu:
    """The nearest thing to a board here: processes confined to one core (``sched_setaffinity``,
    as ``taskset -c CPU``) and to ``percent`` of it by a cgroup CPU quota (cgroup v2 ``cpu.max``
    where the cpu controller is on the unified hierarchy, else cgroup v1 ``cpu.cfs_quota_us``).
    Children started later inherit both. The cgroup is removed at exit, also on failure (its
    processes are moved back to the root cgroup first)."""

    PERIOD_US = 100_000

    def __init__(self, percent: float = 20.0, cpu: int = 0) -> None:
        self.percent, self.cpu = percent, cpu
        self.path: Path | None = None
        self.v2 = False

    def __enter__(self) -> SlowCpu:
        unified = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/cpu")
        quota = int(self.PERIOD_US * self.percent / 100)
        if "cpu" in _read(unified / "cgroup.controllers").split():
            self.v2, parent = True, unified
        elif (v1 / "cpu.cfs_quota_us").exists():
            parent = v1
        else:
            raise BenchError("no cgroup cpu controller (neither cgroup v2 cpu.max nor v1 cpu.cfs_quota_us)")
        path = parent / f"sshfwup-bench-{os.getpid()}"
        try:
            path.mkdir()
        except OSError as e:
            raise BenchError(f"cannot create the cgroup {path} (root needed): {e}") from e
        self.path = path
        try:
            if self.v2:
                (path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}\n")
            else:
                (path / "cpu.cfs_period_us").write_text(f"{self.PERIOD_US}\n")
                (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        except BaseException:
            self.__exit__()
            raise
        return self

    def confine(self, pid: int) -> None:
        """Move ``pid`` (its threads too) onto the slow CPU."""
        assert self.path is not None
        (self.path / "cgroup.procs").write_text(f"{pid}\n")
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {self.cpu})

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started already confined (its start-up counts too)."""
        assert self.path is not None
        script = f'echo $$ > "{self.path}/cgroup.procs" && exec taskset -c {self.cpu} "$@"'
        return ["/bin/sh", "-c", script, "sh", *argv]

    def describe(self) -> str:
        how = "cpu.max" if self.v2 else "cgroup v1 cpu.cfs_quota_us"
        return f"one core (cpu {self.cpu}) at {self.percent:g} % ({how})"

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        root = self.path.parent / "cgroup.procs"
        for _ in range(50):
            pids = _read(self.path / "cgroup.procs").split()
            for pid in pids:
                try:
                    root.write_text(f"{pid}\n")
                except OSError:
                    pass  # exited meanwhile
            try:
                self.path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"warning: could not remove the cgroup {self.path}", file=sys.stderr)
        self.path = None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
