"""sshfwup.sim.loadgen: hey's summary parser, per-phase reports, and short real hey runs."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import pytest

from sshfwup.sim.loadgen import (
    HeySummary,
    LoadError,
    LoadGenerator,
    LoadReport,
    LoadSpec,
    PhaseStats,
    parse_hey_summary,
    poll_version,
)

# Shaped like hey 0.1.4's report (tabs and all), with made-up numbers.
SUMMARY = """
Summary:
  Total:\t2.0128 secs
  Slowest:\t0.0186 secs
  Fastest:\t0.0019 secs
  Average:\t0.0091 secs
  Requests/sec:\t50.1789

  Total data:\t1254400 bytes
  Size/request:\t7840 bytes

Response time histogram:
  0.002 [1]\t|\u25a0
  0.004 [10]\t|\u25a0\u25a0\u25a0\u25a0\u25a0\u25a0\u25a0\u25a0\u25a0\u25a0


Latency distribution:
  10% in 0.0045 secs
  25% in 0.0063 secs
  50% in 0.0083 secs
  75% in 0.0117 secs
  90% in 0.0152 secs
  95% in 0.0171 secs
  99% in 0.0186 secs

Details (average, fastest, slowest):
  DNS+dialup:\t0.0005 secs, 0.0019 secs, 0.0186 secs
  resp read:\t0.0003 secs, 0.0000 secs, 0.0051 secs

Status code distribution:
  [200]\t95 responses
  [503]\t3 responses

Error distribution:
  [2]\tGet "http://127.0.0.1:9/": dial tcp 127.0.0.1:9: connect: connection refused
  [1]\tGet "http://127.0.0.1:9/": read tcp 127.0.0.1:50000->127.0.0.1:9: read: connection reset by peer
"""

NO_RESPONSES = """
Summary:
  Total:\t1.0007 secs
  Slowest:\t0.0000 secs
  Average:\t NaN secs

Latency distribution:

Status code distribution:

Error distribution:
  [20]\tGet "http://127.0.0.1:9/": dial tcp 127.0.0.1:9: connect: connection refused
"""


def test_parse_hey_summary_counts_responses_errors_and_percentiles() -> None:
    s = parse_hey_summary(SUMMARY)
    assert s.status_codes == ((200, 95), (503, 3))
    assert s.responses == 98 and s.ok == 95 and s.non_2xx == 3
    assert s.transport_errors == 3 and s.refused == 2
    assert s.sent == 101 and s.failed == 6
    assert s.percentile(50) == pytest.approx(0.0083)
    assert s.percentile(99) == pytest.approx(0.0186)
    assert s.percentile(42) is None
    assert s.seconds == pytest.approx(2.0128)


def test_parse_hey_summary_without_any_response() -> None:
    s = parse_hey_summary(NO_RESPONSES)
    assert s.responses == 0 and s.sent == 20 and s.failed == 20 and s.refused == 20
    assert s.percentile(50) is None


def test_parse_hey_summary_rejects_other_output() -> None:
    with pytest.raises(LoadError, match="no summary"):
        parse_hey_summary("flag provided but not defined: -x\nUsage: hey [options...] <url>\n")


def test_report_adds_up_phases() -> None:
    good = HeySummary(status_codes=((200, 1000),), percentiles=((50, 0.002), (99, 0.010)))
    bad = HeySummary(status_codes=((200, 400), (502, 1)), errors=(("connect: connection refused", 2),))
    report = LoadReport(
        LoadSpec("http://127.0.0.1:1/"),
        (PhaseStats("before", 10.0, 15.0, good), PhaseStats("during", 15.0, 17.0, bad)),
    )
    assert report.sent == 1403 and report.failed == 3 and report.refused == 2
    assert report.duration == pytest.approx(7.0)
    assert report.rate == pytest.approx(1403 / 7.0)
    assert report.phase("before").rate == pytest.approx(200.0)
    assert report.phase("during").p50 is None and report.phase("before").p99 == pytest.approx(0.010)
    assert report.errors() == {"connect: connection refused": 2}
    with pytest.raises(KeyError):
        report.phase("after")
    table = report.table().splitlines()
    assert table[1].split()[:6] == ["before", "5.0", "1000", "200", "0", "0"]
    assert table[2].split()[:6] == ["during", "2.0", "403", "202", "3", "2"]
    assert table[-1].split()[:5] == ["total", "7.0", "1403", "200", "3"]


def test_spec_argv_splits_the_rate_over_workers() -> None:
    argv = LoadSpec("http://127.0.0.1:8080/", rate=200, concurrency=10, keepalive=False).argv("hey")
    assert argv[argv.index("-q") + 1] == "20" and argv[argv.index("-c") + 1] == "10"
    assert "-disable-keepalive" in argv and argv[-1] == "http://127.0.0.1:8080/"
    assert "-disable-keepalive" not in LoadSpec("http://x/").argv()
    with pytest.raises(ValueError):
        LoadSpec("ftp://x/")


# --- real hey against a tiny local server ------------------------------------------------------

needs_hey = pytest.mark.skipif(shutil.which("hey") is None, reason="hey is not installed")


@dataclass
class TinyServer:
    port: int
    version: str = "1.0.0"
    requests: int = 0
    connections: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                close = False
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    close = close or header.lower().startswith(b"connection: close")
                self.requests += 1
                path = line.split()[1]
                status = "500 Internal Server Error" if path == b"/fail" else "200 OK"
                body = json.dumps({"version": self.version}).encode()
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.fixture
async def tiny_server() -> AsyncIterator[TinyServer]:
    state = TinyServer(port=0)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens here once the socket is closed


@needs_hey
async def test_real_hey_phases_count_every_request(tiny_server: TinyServer) -> None:
    spec = LoadSpec(tiny_server.url, rate=100, concurrency=4, keepalive=False, request_timeout=5)
    async with LoadGenerator(spec) as load:
        await anyio.sleep(1.0)
        await load.mark("during")
        assert load.current_phase == "during"
        await anyio.sleep(1.0)
    report = load.report
    assert [p.name for p in report.phases] == ["before", "during"]
    for phase in report.phases:
        assert 60 <= phase.sent <= 140, phase  # ~100 req/s for ~1 s
        assert phase.failed == 0 and phase.refused == 0
        assert phase.p50 is not None and phase.p99 is not None and phase.p50 <= phase.p99
    assert report.phase("before").ended == report.phase("during").started
    # every request hey counted reached the server, each on its own connection
    assert report.sent == tiny_server.requests == tiny_server.connections


@needs_hey
async def test_real_hey_counts_non_2xx_as_failed_with_keepalive(tiny_server: TinyServer) -> None:
    spec = LoadSpec(tiny_server.url + "fail", rate=100, concurrency=4, request_timeout=5)
    async with LoadGenerator(spec, first_phase="only") as load:
        await anyio.sleep(0.6)
    phase = load.report.phase("only")
    assert phase.sent > 20 and phase.failed == phase.sent and phase.summary.non_2xx == phase.sent
    assert phase.sent == tiny_server.requests
    assert tiny_server.connections <= 2 * spec.concurrency  # connections were reused


@needs_hey
async def test_real_hey_counts_refused_connections() -> None:
    spec = LoadSpec(f"http://127.0.0.1:{_closed_port()}/", rate=50, concurrency=2, request_timeout=2)
    async with LoadGenerator(spec) as load:
        await anyio.sleep(0.5)
    report = load.report
    assert report.sent > 5
    assert report.failed == report.sent == report.refused
    assert report.phase("before").p50 is None


async def test_generator_without_hey_says_so() -> None:
    with pytest.raises(LoadError, match="not found"):
        async with LoadGenerator(LoadSpec("http://127.0.0.1:1/"), hey="/nonexistent/hey"):
            pass


async def test_poll_version_sees_the_switch(tiny_server: TinyServer) -> None:
    switched: list[float] = []

    def switch() -> None:
        tiny_server.version = "2.0.0"
        switched.append(time.monotonic())

    asyncio.get_running_loop().call_later(0.3, switch)
    seen = await poll_version(tiny_server.url, "2.0.0", timeout=5)
    assert switched and switched[0] <= seen < switched[0] + 0.5
    assert tiny_server.requests > 3  # it polled the old version first


async def test_poll_version_times_out() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer version '9'"):
        await poll_version(f"http://127.0.0.1:{_closed_port()}/", "9", timeout=0.3)
    assert time.monotonic() - started < 2


@needs_hey
async def test_run_in_a_task_group_for_a_duration(tiny_server: TinyServer) -> None:
    load = LoadGenerator(LoadSpec(tiny_server.url, rate=50, concurrency=2))
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        await tg.start(load.run, 0.6)
        with pytest.raises(LoadError, match="still running"):
            load.report  # noqa: B018 - the property raises while the load runs
    assert 0.5 < time.monotonic() - started < 5
    assert load.report.phase("before").sent == tiny_server.requests > 10
