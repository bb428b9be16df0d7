"""Hand-off during real swaps: sshfwup.supervisor.supervisor with the sample app (counter, /stream) as real
processes on 127.0.0.1; a client holds streaming connections through the swap and checks that
the sequence it reads has no gap and no repeat, and says which version sent each line."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Sim, assert_applied, output, upload

from sshfwup.config import AppConfig, SocketSpec
from sshfwup.sim.rootfs import SAMPLE_APP
from sshfwup.sim.stream_client import StreamClient
from sshfwup.supervisor.supervisor import AppSource, Supervisor, SwapFailed

REPO = Path(__file__).resolve().parents[2]
TEST_TIMEOUT = 40


def install(tmp_path: Path, slot: str, version: str, **behavior: Any) -> AppSource:
    root = tmp_path / f"rootfs-{slot}-{version}"
    app_dir = root / "srv" / "app"
    app_dir.mkdir(parents=True)
    shutil.copy(SAMPLE_APP, app_dir / "app.py")
    (app_dir / "VERSION").write_text(f"{version}\n")
    (app_dir / "behavior.json").write_text(json.dumps({"ready_delay": 0.05, **behavior}))
    return AppSource(root, slot, version)


def config(**overrides: Any) -> AppConfig:
    base = AppConfig(
        command=(sys.executable, "{app_dir}/app.py"),
        app_dir="/srv/app",
        env=(("PYTHONPATH", str(REPO)),),
        sockets=(SocketSpec("tcp", "127.0.0.1", 0, "http"),),
        ready="notify",
        ready_timeout=10.0,
        drain_timeout=5.0,
        observe=0.5,
        health_interval=0.1,
        stall_timeout=1.0,  # the stop-accepting test need not wait the default 5 s
        restart_backoff=(0.1, 2.0),
        user="",
        handoff=True,
        handoff_timeout=3.0,
    )
    return replace(base, **overrides)


async def get_json(port: int, path: str) -> Any:
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(f"GET {path} HTTP/1.1\r\nHost: device\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            try:
                data += await conn.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


@asynccontextmanager
async def streaming(sup: Supervisor, count: int, interval: float = 0.01) -> AsyncIterator[list[StreamClient]]:
    port = sup.sockets[0].sock.getsockname()[1]
    clients = [StreamClient(port, interval=interval) for _ in range(count)]
    async with anyio.create_task_group() as tasks:
        for client in clients:
            await tasks.start(client.run)
        await anyio.sleep(0.1)
        yield clients
        await anyio.sleep(0.3)  # lines from after the swap
        tasks.cancel_scope.cancel()


@asynccontextmanager
async def running(cfg: AppConfig, marker: str, first: AppSource) -> AsyncIterator[tuple[Supervisor, int]]:
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(cfg, marker=marker) as sup:
            await sup.start(first)
            yield sup, sup.sockets[0].sock.getsockname()[1]


async def count(port: int) -> int:
    return int((await get_json(port, "/count"))["count"])


async def test_streams_and_the_counter_move_to_the_new_version(tmp_path: Path, marker: str) -> None:
    v1, v2 = install(tmp_path, "a", "1.0.0"), install(tmp_path, "b", "2.0.0")
    lines: list[str] = []
    async with running(config(), marker, v1) as (sup, port):
        assert [await count(port) for _ in range(3)] == [1, 2, 3]
        async with streaming(sup, 3) as clients:
            result = await sup.swap(v2, report=lines.append)
        assert await count(port) == 4  # the counter went on in 2.0.0
        assert (await get_json(port, "/"))["version"] == "2.0.0"
    for client in clients:
        assert not client.closed, "the stream was cut"
        assert client.first_break() is None
        assert client.versions() == ["1.0.0", "2.0.0"]
    assert result.handoff.startswith("handed over 3 connections, ") and result.handoff.endswith(" of state")
    assert any(line.startswith("2.0.0 took over 3 connections") for line in lines), lines


async def test_a_refused_state_version_falls_back_to_the_drain(tmp_path: Path, marker: str) -> None:
    v1, v2 = install(tmp_path, "a", "1.0.0"), install(tmp_path, "b", "2.0.0", handoff_accept=[2])
    lines: list[str] = []
    async with running(config(), marker, v1) as (sup, port):
        await count(port)
        async with streaming(sup, 2) as clients:
            result = await sup.swap(v2, report=lines.append)
        assert await count(port) == 1  # 2.0.0 started clean
    assert result.handoff.startswith("no hand-off: 2.0.0 refused state version 1")
    assert "no hand-off: 2.0.0 refused state version 1" in "\n".join(lines)
    for client in clients:
        assert client.closed and client.versions() == ["1.0.0"]  # ended by 1.0.0's drain, as without hand-off
        assert client.first_break() is None


async def test_a_new_version_failing_after_taking_over_hands_everything_back(tmp_path: Path, marker: str) -> None:
    v1 = install(tmp_path, "a", "1.0.0")
    v2 = install(tmp_path, "b", "2.0.0", stop_accepting_after=0.2)  # alive, but its public socket hangs
    async with running(config(observe=1.5), marker, v1) as (sup, port):
        assert [await count(port) for _ in range(2)] == [1, 2]
        async with streaming(sup, 2) as clients:
            with pytest.raises(SwapFailed) as failed:
                await sup.swap(v2)
        assert sup.current is not None and sup.current.version == "1.0.0"
        assert await count(port) == 3  # the counter came back
    assert "stopped accepting connections" in failed.value.reason
    assert "1.0.0 started again from slot a" in failed.value.rollback
    assert "handed back 2 connections" in failed.value.rollback
    for client in clients:
        assert not client.closed, "the stream was cut"
        assert client.first_break() is None
        assert client.versions() == ["1.0.0", "2.0.0", "1.0.0"]


async def test_a_new_version_dying_after_taking_over_loses_what_it_took(tmp_path: Path, marker: str) -> None:
    v1, v2 = install(tmp_path, "a", "1.0.0"), install(tmp_path, "b", "2.0.0", crash_after=0.2)
    async with running(config(observe=1.0), marker, v1) as (sup, port):
        await count(port)
        async with streaming(sup, 1) as clients:
            with pytest.raises(SwapFailed) as failed:
                await sup.swap(v2)
        assert sup.current is not None and sup.current.version == "1.0.0"
        assert await count(port) == 1  # 1.0.0 started again from its own state: nothing
    assert "lost what 2.0.0 had taken over (1 connection, " in failed.value.rollback
    assert "exited with status 3" in failed.value.rollback
    assert clients[0].closed


async def test_the_old_version_dying_mid_hand_off_leaves_the_new_one_clean(tmp_path: Path, marker: str) -> None:
    v1, v2 = install(tmp_path, "a", "1.0.0", handoff_die=True), install(tmp_path, "b", "2.0.0")
    lines: list[str] = []
    async with running(config(), marker, v1) as (sup, port):
        await count(port)
        async with streaming(sup, 1) as clients:
            result = await sup.swap(v2, report=lines.append)
        assert sup.current is not None and sup.current.version == "2.0.0"
        assert await count(port) == 1
    assert "1.0.0 closed its channel" in result.handoff and "2.0.0 starts clean" in result.handoff
    assert "old version 1.0.0 had already stopped (exited with status 4)" in lines
    assert clients[0].closed



async def test_a_new_version_that_does_not_ask_gets_nothing_and_the_old_one_drains(tmp_path: Path, marker: str) -> None:
    v1, v2 = install(tmp_path, "a", "1.0.0"), install(tmp_path, "b", "2.0.0", handoff_ignore=True)
    async with running(config(), marker, v1) as (sup, port):
        async with streaming(sup, 1) as clients:
            result = await sup.swap(v2)
        assert await count(port) == 1
    assert result.handoff == "no hand-off: 2.0.0 became ready without asking for the hand-off"
    assert result.drain_seconds < 4  # the old version was never paused: it drained at once
    assert clients[0].closed and clients[0].first_break() is None


@pytest.mark.slow
@pytest.mark.parametrize(("streams", "padding"), [(100, 8 << 20), (250, 1 << 20)])
async def test_many_streams_and_megabytes_of_state_move_back_and_forth(
    tmp_path: Path, marker: str, streams: int, padding: int
) -> None:
    """The bounds' neighbourhood: up to 250 sockets (four SOCK messages each way), 8 MiB of state,
    swapped 1.0.0 → 2.0.0 → 1.0.0; every stream unbroken."""
    behavior = {"state_padding": padding}
    v1, v2 = install(tmp_path, "a", "1.0.0", **behavior), install(tmp_path, "b", "2.0.0", **behavior)
    v1_again = AppSource(v1.root, "a", "1.0.0")
    results = []
    async with running(config(handoff_max_state=16 << 20), marker, v1) as (sup, port):
        async with streaming(sup, streams, interval=0.1) as clients:
            results.append(await sup.swap(v2))
            results.append(await sup.swap(v1_again))
    assert [r.handoff.split(",")[0] for r in results] == [f"handed over {streams} connections"] * 2
    for client in clients:
        assert not client.closed and client.first_break() is None
        assert client.versions() == ["1.0.0", "2.0.0", "1.0.0"]


# --- end to end: an upload through OpenSSH, the real fwup, the simulated device -------------------


@pytest.mark.parametrize("sim_config", [{"app": {"handoff": True, "observe": 1}}])
async def test_an_upload_keeps_a_live_stream_and_the_verdict_says_what_moved(sim: Sim, firmware: Any) -> None:
    assert [sim.app("/count")["count"] for _ in range(2)] == [1, 2]
    client = StreamClient(sim.app_port, interval=0.01)
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tasks:
            await tasks.start(client.run)
            result = await upload(sim, firmware("2.0.0", hot=True))
            await anyio.sleep(0.3)
            tasks.cancel_scope.cancel()
    assert_applied(sim, result)
    text = output(result)
    assert "2.0.0 took over 1 connection, " in text and "handed over 1 connection, " in text, text
    assert not client.closed, "the stream was cut"
    assert client.first_break() is None
    assert client.versions() == ["1.0.0", "2.0.0"]
    assert sim.app("/count")["count"] == 3
    assert "handed over 1 connection, " in sim.status()["last_update"]["verdict"]


@pytest.mark.parametrize("sim_config", [{"app": {"handoff": True, "observe": 1}}])
async def test_an_upload_whose_app_refuses_the_state_drains_and_says_so(sim: Sim, firmware: Any) -> None:
    client = StreamClient(sim.app_port, interval=0.01)
    with anyio.fail_after(120):
        async with anyio.create_task_group() as tasks:
            await tasks.start(client.run)
            result = await upload(sim, firmware("2.0.0", hot=True, app_behavior={"handoff_accept": [2]}))
            tasks.cancel_scope.cancel()
    assert_applied(sim, result)
    assert "no hand-off: 2.0.0 refused state version 1" in output(result)
    assert client.closed and client.versions() == ["1.0.0"]  # drained with 1.0.0, as without hand-off
    assert sim.app("/count")["count"] == 1
