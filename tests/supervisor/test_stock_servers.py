"""Stock servers swapped by the supervisor under unthrottled load: gunicorn, uvicorn ``--fd 3``,
hypercorn ``--bind fd://3`` (installed into the venv from PyPI by the test extra).

Each test swaps twice while hey sends requests as fast as it can — a new connection per request
(the case where a draining server closes a connection it accepted but had not read yet) and
keep-alive — and requires every request to succeed. A bounded sample: bench/stock_servers.py
runs 8 swaps per server, unthrottled, and compares with the shared-socket path.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import anyio
import pytest
from apps import stock
from httpload import Load, get

from sshfwup.sim.loadgen import LoadGenerator
from sshfwup.supervisor.supervisor import Supervisor, SwapFailed

STOCK = ["gunicorn", "uvicorn", "hypercorn"]
TEST_TIMEOUT = 90


def server_for(name: str) -> stock.StockServer:
    server = stock.SERVERS[name]
    if (problem := server.missing()) is not None:
        pytest.fail(problem)
    return server


@pytest.mark.parametrize("name", STOCK)
async def test_a_stock_server_swaps_under_unthrottled_load_without_a_failed_request(
    name: str, tmp_path: Path, marker: str
) -> None:
    server = server_for(name)
    v1, v2 = server.install(tmp_path, "a", "1.0.0"), server.install(tmp_path, "b", "2.0.0")
    config = server.config(steered=True, observe=0.3)
    results = []
    lines: list[tuple[float, str]] = []
    answers: list[tuple[float, str]] = []  # a new connection per request, with the version answering
    running = [True]
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(config, marker=marker) as sup:
            await sup.start(v1)
            port = sup.sockets[0].sock.getsockname()[1]
            url = f"http://127.0.0.1:{port}/"
            async with (
                LoadGenerator(stock.unthrottled(url, concurrency=6, keepalive=False)) as fresh,
                LoadGenerator(stock.unthrottled(url, concurrency=2, keepalive=True)) as kept,
                anyio.create_task_group() as tasks,
            ):
                tasks.start_soon(stock.fresh_requests, port, answers, running)
                await anyio.sleep(0.5)
                for source in (v2, v1):
                    results.append(await sup.swap(source, report=lambda line: lines.append((time.monotonic(), line))))
                    await anyio.sleep(0.3)
                running[0] = False
            final = await get(port)

    for load in (fresh.report, kept.report):
        assert load.failed == 0, f"{load.failed} of {load.sent} failed: {load.errors()}"
    assert fresh.report.sent >= 500 and kept.report.sent >= 500, (fresh.report.sent, kept.report.sent)
    assert [r.socket_path for r in results] == [stock.expected_socket_path()] * 2
    assert all(r.handover_seconds >= 0.25 for r in results)
    # Between the hand-over and the old version's SIGTERM, new connections reach the new one only.
    for new, old in (("2.0.0", "1.0.0"), ("1.0.0", "2.0.0")):
        steered = next(at for at, line in lines if line.startswith(f"new connections go to {new} now"))
        stopping = next(at for at, line in lines if line.startswith(f"old version {old} drained"))
        assert stock.answers_between(answers, steered, stopping) == {new}
    assert final.status == 200 and final.body.startswith("1.0.0 ")


@pytest.mark.parametrize("name", STOCK)
async def test_a_broken_release_of_a_stock_server_is_refused_while_the_old_one_serves(
    name: str, tmp_path: Path, marker: str
) -> None:
    server = server_for(name)
    v1, broken = server.install(tmp_path, "a", "1.0.0"), server.install(tmp_path, "b", "2.0.0", broken=True)
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(server.config(steered=True), marker=marker) as sup:
            old = await sup.start(v1)
            port = sup.sockets[0].sock.getsockname()[1]
            load = Load(port)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(load.run)
                with pytest.raises(SwapFailed) as failure:
                    await sup.swap(broken)
                # a release that fails fast leaves little load behind it: keep the old one under
                # load a little longer, so the check below is about enough requests
                with anyio.move_on_after(5):
                    while len(load.answers) < 20:
                        await anyio.sleep(0.05)
                load.running = False
            assert sup.current is not None and sup.current.pid == old.pid
            assert (await get(port)).body.startswith("1.0.0 ")

    assert re.fullmatch(r"2\.0\.0 exited with status \d+ before it became ready", failure.value.reason)
    assert failure.value.rollback == f"1.0.0 is still serving (pid {old.pid})"
    assert load.failures == [] and len(load.answers) >= 20
    assert {version for _, version in load.answers} == {"1.0.0"}


async def test_a_saturated_sync_worker_server_is_busy_not_dead(tmp_path: Path, marker: str) -> None:
    """Issue #20: one gunicorn sync worker, eight keep-alive clients. The worker serves one
    connection at a time, so the others' connections always wait in the accept queue, and new
    ones arrive as fast as the worker accepts: the queue's length hardly moves while it drains.
    A health check that reads "a probe connection still queued after a second" as death rolled
    back good versions here; the swap must complete, and observe the new version under that load."""
    server = stock.sync_workers(server_for("gunicorn"), workers=1)
    v1, v2 = server.install(tmp_path, "a", "1.0.0"), server.install(tmp_path, "b", "2.0.0")
    config = server.config(steered=True, observe=2.0, health_interval=0.1)
    results = []
    queued: list[int] = []  # the public socket's accept queue, sampled while the load runs
    running = [True]

    async def sample(sup: Supervisor) -> None:
        while running[0]:
            listener = sup.sockets[0]
            queued.append(listener.queued(listener.sock))
            await anyio.sleep(0.05)

    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(config, marker=marker) as sup:
            await sup.start(v1)
            url = f"http://127.0.0.1:{sup.sockets[0].sock.getsockname()[1]}/"
            async with (
                LoadGenerator(stock.unthrottled(url, concurrency=8, keepalive=True)) as load,
                anyio.create_task_group() as tasks,
            ):
                tasks.start_soon(sample, sup)
                await anyio.sleep(0.5)
                for source in (v2, v1):
                    results.append(await sup.swap(source))  # SwapFailed here is the bug
                running[0] = False
            final = await get(sup.sockets[0].sock.getsockname()[1])

    assert [(r.old_version, r.new_version) for r in results] == [("1.0.0", "2.0.0"), ("2.0.0", "1.0.0")]
    assert all(r.observe_seconds == 2.0 for r in results)
    # The scenario really was saturation: connections waited for the one worker most of the time.
    assert sorted(queued)[len(queued) // 2] >= 2, queued
    assert load.report.failed == 0, f"{load.report.failed} of {load.report.sent} failed: {load.report.errors()}"
    assert final.status == 200 and final.body.startswith("1.0.0 ")
