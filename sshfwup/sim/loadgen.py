"""HTTP load during an update: hey at a fixed rate, split into phases, summarized per phase.

    async with LoadGenerator(LoadSpec(url, rate=200)) as load:   # phase "before" starts
        ...
        await load.mark("during")      # e.g. when the upload starts
        ...
        await load.mark("after")       # e.g. when the verdict arrives
        ...
    report = load.report               # LoadReport: per phase sent / failed / refused / p50 / p99

Why one hey process per phase, and hey's text summary rather than its CSV: ``hey -o csv`` lists
only requests that got a response. A refused, reset or timed-out request appears nowhere in it,
so splitting the CSV by time would report "0 failed" exactly when requests failed. hey's summary
does count them ("Error distribution"). So every phase is its own hey run: ``mark()`` starts the
next run, lets it warm up for one request interval, then stops the previous run with SIGINT —
hey stops its workers, waits for requests in flight and prints its summary. Requests the previous
run sends during that hand-over count for the previous phase.

hey's ``-q`` is per worker: the spec's ``rate`` is divided by ``concurrency``. hey prints
latency percentiles with 0.1 ms resolution (10/25/50/75/90/95/99 %); p50 and p99 come from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import subprocess
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import anyio.abc

log = logging.getLogger(__name__)

__all__ = [
    "HeySummary",
    "LoadError",
    "LoadGenerator",
    "LoadReport",
    "LoadSpec",
    "PhaseStats",
    "parse_hey_summary",
    "poll_version",
]

STOP_GRACE = 5.0  # seconds beyond the request timeout that a stopped hey gets to print its summary


class LoadError(Exception):
    """hey could not be run, or its output could not be understood."""


@dataclass(frozen=True)
class LoadSpec:
    url: str
    rate: float = 200.0  # requests per second, all workers together
    concurrency: int = 10
    keepalive: bool = True  # False: a new TCP connection for every request
    request_timeout: float = 10.0  # seconds; a slower request counts as failed
    max_phase: float = 3600.0  # seconds; a phase nobody ends stops here (hey -z)

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.concurrency < 1:
            raise ValueError(f"rate and concurrency must be positive, got {self.rate} and {self.concurrency}")
        if urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError(f"expected an http:// or https:// URL, got {self.url!r}")

    @property
    def interval(self) -> float:
        """Seconds between two requests of one worker."""
        return self.concurrency / self.rate

    def argv(self, hey: str = "hey") -> list[str]:
        args = [
            hey,
            "-z", f"{self.max_phase:g}s",
            "-c", str(self.concurrency),
            "-q", f"{self.rate / self.concurrency:g}",
            "-t", f"{max(1, round(self.request_timeout))}",
        ]  # fmt: skip
        if not self.keepalive:
            args.append("-disable-keepalive")
        return [*args, self.url]


# --- hey's summary ---------------------------------------------------------------------------

_PERCENTILE = re.compile(r"^\s*(\d+)% in ([0-9.]+) secs\s*$")
_STATUS = re.compile(r"^\s*\[(\d{3})\]\s+(\d+) responses\s*$")
_ERROR = re.compile(r"^\s*\[(\d+)\]\s+(.+?)\s*$")
_TOTAL = re.compile(r"^\s*Total:\s+([0-9.]+) secs\s*$")


@dataclass(frozen=True)
class HeySummary:
    """What one hey run printed: responses by status code, errors by message, latency percentiles."""

    status_codes: tuple[tuple[int, int], ...] = ()  # (status code, responses)
    errors: tuple[tuple[str, int], ...] = ()  # (hey's error message, count)
    percentiles: tuple[tuple[int, float], ...] = ()  # (percent, seconds), responses only
    seconds: float = 0.0  # hey's own run time

    @property
    def responses(self) -> int:
        return sum(n for _, n in self.status_codes)

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.status_codes if 200 <= code < 300)

    @property
    def non_2xx(self) -> int:
        return self.responses - self.ok

    @property
    def transport_errors(self) -> int:
        return sum(n for _, n in self.errors)

    @property
    def refused(self) -> int:
        return sum(n for message, n in self.errors if "connection refused" in message)

    @property
    def sent(self) -> int:
        return self.responses + self.transport_errors

    @property
    def failed(self) -> int:
        return self.non_2xx + self.transport_errors

    def percentile(self, percent: int) -> float | None:
        for p, seconds in self.percentiles:
            if p == percent:
                return seconds
        return None


def parse_hey_summary(text: str) -> HeySummary:
    """Parse hey's default (text) report. Raises LoadError if it is not one."""
    if "Summary:" not in text:
        raise LoadError(f"hey printed no summary: {text.strip()[:300]!r}")
    section = ""
    status: dict[int, int] = {}
    errors: dict[str, int] = {}
    percentiles: list[tuple[int, float]] = []
    seconds = 0.0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith(":") and not line.startswith((" ", "\t")):
            section = stripped[:-1]
            continue
        if section == "Summary" and (m := _TOTAL.match(line)):
            seconds = float(m.group(1))
        elif section == "Latency distribution" and (m := _PERCENTILE.match(line)):
            percentiles.append((int(m.group(1)), float(m.group(2))))
        elif section == "Status code distribution" and (m := _STATUS.match(line)):
            status[int(m.group(1))] = status.get(int(m.group(1)), 0) + int(m.group(2))
        elif section == "Error distribution" and (m := _ERROR.match(line)):
            errors[m.group(2)] = errors.get(m.group(2), 0) + int(m.group(1))
    return HeySummary(
        status_codes=tuple(sorted(status.items())),
        errors=tuple(sorted(errors.items())),
        percentiles=tuple(percentiles),
        seconds=seconds,
    )


# --- phases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhaseStats:
    name: str
    started: float  # time.monotonic()
    ended: float
    summary: HeySummary

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def sent(self) -> int:
        return self.summary.sent

    @property
    def failed(self) -> int:
        return self.summary.failed

    @property
    def refused(self) -> int:
        return self.summary.refused

    @property
    def p50(self) -> float | None:
        return self.summary.percentile(50)

    @property
    def p99(self) -> float | None:
        return self.summary.percentile(99)

    @property
    def rate(self) -> float:
        return self.sent / self.duration if self.duration else 0.0


@dataclass(frozen=True)
class LoadReport:
    spec: LoadSpec
    phases: tuple[PhaseStats, ...] = field(default_factory=tuple)

    def phase(self, name: str) -> PhaseStats:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def sent(self) -> int:
        return sum(p.sent for p in self.phases)

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.phases)

    @property
    def refused(self) -> int:
        return sum(p.refused for p in self.phases)

    @property
    def duration(self) -> float:
        return self.phases[-1].ended - self.phases[0].started if self.phases else 0.0

    @property
    def rate(self) -> float:
        return self.sent / self.duration if self.duration else 0.0

    def errors(self) -> dict[str, int]:
        """Every transport error message hey reported, with its count over all phases."""
        out: dict[str, int] = {}
        for p in self.phases:
            for message, n in p.summary.errors:
                out[message] = out.get(message, 0) + n
        return out

    def table(self) -> str:
        """A plain-text table: one line per phase and a total."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f}"

        lines = [
            f"{'phase':<8} {'secs':>6} {'sent':>7} {'req/s':>6} {'failed':>6} {'refused':>7} {'p50 ms':>7} {'p99 ms':>7}"
        ]
        for p in self.phases:
            lines.append(
                f"{p.name:<8} {p.duration:6.1f} {p.sent:7d} {p.rate:6.0f} {p.failed:6d} {p.refused:7d}"
                f" {ms(p.p50):>7} {ms(p.p99):>7}"
            )
        lines.append(
            f"{'total':<8} {self.duration:6.1f} {self.sent:7d} {self.rate:6.0f} {self.failed:6d} {self.refused:7d}"
        )
        return "\n".join(lines)


@dataclass
class _Run:
    """One hey process: one phase."""

    name: str
    process: anyio.abc.Process
    started: float
    output: bytearray = field(default_factory=bytearray)
    errors: bytearray = field(default_factory=bytearray)
    exited_at: float | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


class LoadGenerator:
    """Runs hey against ``spec.url`` phase by phase; see the module documentation.

    Use as an async context manager, or run it in your own task group with
    ``await tg.start(load.run)`` (or ``tg.start(load.run, 30)`` for 30 seconds) and end it with
    ``await load.stop()``.
    """

    def __init__(self, spec: LoadSpec, *, hey: str = "hey", first_phase: str = "before") -> None:
        self.spec = spec
        self.hey = hey
        self.first_phase = first_phase
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._current: _Run | None = None
        self._phases: list[PhaseStats] = []
        self._stopped: anyio.Event | None = None  # made in __aenter__: an Event needs the event loop
        self._report: LoadReport | None = None

    @property
    def report(self) -> LoadReport:
        if self._report is None:
            raise LoadError("the load is still running (stop() it first)")
        return self._report

    @property
    def phases(self) -> tuple[PhaseStats, ...]:
        """Phases finished so far."""
        return tuple(self._phases)

    @property
    def current_phase(self) -> str | None:
        return self._current.name if self._current else None

    async def __aenter__(self) -> LoadGenerator:
        if shutil.which(self.hey) is None:
            raise LoadError(f"{self.hey} not found (Debian: apt install hey)")
        if self._stack is not None:
            raise LoadError("a LoadGenerator runs once; make a new one")
        self._stopped = anyio.Event()
        stack = AsyncExitStack()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        try:
            self._current = await self._start(self.first_phase)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self._stack is not None
        try:
            if exc is None:
                await self.stop()
            else:
                self._kill_all()
        finally:
            await self._stack.aclose()

    async def run(
        self, duration: float | None = None, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the load from a caller's task group: until :meth:`stop`, ``duration`` seconds, or
        cancellation. The report is then in :attr:`report`."""
        async with self:
            task_status.started()
            assert self._stopped is not None
            with anyio.move_on_after(duration):
                await self._stopped.wait()

    async def mark(self, phase: str) -> None:
        """End the current phase now and start ``phase``."""
        if self._current is None:
            raise LoadError("the load is not running")
        if any(p.name == phase for p in self._phases) or phase == self._current.name:
            raise ValueError(f"phase {phase!r} already happened")
        at = time.monotonic()
        previous = self._current
        self._current = await self._start(phase, at)
        await anyio.sleep(self.spec.interval)  # the new workers' first tick: no dip in the rate
        self._phases.append(await self._finish(previous, at))

    async def stop(self) -> LoadReport:
        """End the current phase and return the report (idempotent)."""
        if self._report is not None:
            return self._report
        if self._current is not None:
            run, self._current = self._current, None
            self._phases.append(await self._finish(run, time.monotonic()))
        self._report = LoadReport(self.spec, tuple(self._phases))
        if self._stopped is not None:
            self._stopped.set()
        return self._report

    # --- hey processes

    async def _start(self, name: str, at: float | None = None) -> _Run:
        assert self._tg is not None
        argv = self.spec.argv(self.hey)
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # hey runs up to max_phase (an hour) and writes only at its end: if we are killed it
            # would keep loading a device that is gone. util-linux's setpriv sets PR_SET_PDEATHSIG
            # and execs it. (That signal follows the *thread* that forked: here the event loop's,
            # which lives as long as the load does.)
            argv = [setpriv, "--pdeathsig", "TERM", *argv]
        try:
            process = await anyio.open_process(argv, stdin=subprocess.DEVNULL)
        except OSError as e:
            raise LoadError(f"cannot start {self.hey}: {e}") from None
        run = _Run(name, process, at if at is not None else time.monotonic())
        self._tg.start_soon(self._collect, run)
        log.debug("phase %s: %s (pid %d)", name, " ".join(argv), process.pid)
        return run

    async def _collect(self, run: _Run) -> None:
        assert run.process.stdout is not None and run.process.stderr is not None

        async def drain(stream: anyio.abc.ByteReceiveStream, into: bytearray) -> None:
            async for chunk in stream:
                into += chunk

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, run.process.stdout, run.output)
                tg.start_soon(drain, run.process.stderr, run.errors)
            await run.process.wait()
            run.exited_at = time.monotonic()
        finally:
            run.done.set()

    async def _finish(self, run: _Run, at: float) -> PhaseStats:
        if run.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                run.process.send_signal(signal.SIGINT)  # hey: stop workers, wait in-flight, print
        with anyio.move_on_after(self.spec.request_timeout + STOP_GRACE):
            await run.done.wait()
        if not run.done.is_set():
            run.process.kill()
            await run.done.wait()
            raise LoadError(f"hey (phase {run.name}) did not stop within {self.spec.request_timeout + STOP_GRACE:g} s")
        text = run.output.decode("utf-8", errors="replace")
        if run.process.returncode != 0 or "Summary:" not in text:
            detail = run.errors.decode("utf-8", errors="replace").strip() or text.strip()
            raise LoadError(f"hey (phase {run.name}) exited with status {run.process.returncode}: {detail[:500]}")
        ended = min(at, run.exited_at) if run.exited_at is not None else at
        return PhaseStats(run.name, run.started, ended, parse_hey_summary(text))

    def _kill_all(self) -> None:
        run, self._current = self._current, None
        if run is not None and run.process.returncode is None:
            run.process.kill()
        if self._stopped is not None:
            self._stopped.set()


# --- "is the new version serving yet?" ------------------------------------------------------


async def _get_json(host: str, port: int, path: str, timeout: float) -> object:
    with anyio.fail_after(timeout):
        async with await anyio.connect_tcp(host, port) as stream:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
            await stream.send(request.encode("latin-1"))
            data = bytearray()
            async for chunk in stream:
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or status_line[1] != b"200":
        raise ValueError(f"HTTP status {status_line[1:2]}")
    return json.loads(body)


async def poll_version(
    url: str, expected: str, timeout: float = 10.0, *, interval: float = 0.01, field_name: str = "version"
) -> float:
    """Poll ``GET url`` (a new connection each time) until its JSON ``version`` is ``expected``.

    Returns the ``time.monotonic()`` at which that answer arrived. Failed polls (refused, a
    non-200 answer, another version) just poll again; raises TimeoutError after ``timeout``.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http:// URL, got {url!r}")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{url} did not answer {field_name} {expected!r} within {timeout:g} s (last: {last})")
        try:
            answer = await _get_json(host, port, path, min(remaining, 2.0))
            seen = answer.get(field_name) if isinstance(answer, dict) else None
            if seen == expected:
                return time.monotonic()
            last = f"{field_name} {seen!r}"
        except (OSError, TimeoutError, ValueError, anyio.BrokenResourceError) as e:
            last = f"{type(e).__name__}: {e}"
        await anyio.sleep(interval)

