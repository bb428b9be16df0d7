"""Hand-off during real swaps: sshfwup.supervisor with the sample app (counter, /stream) as real
processes on 127.0.0.1; a client holds streaming connections through the swap and checks that
the sequence it reads has no gap and no repeat, and says which version sent each line."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from sshfwup.config import AppConfig, SocketSpec
from sshfwup.sim.rootfs import SAMPLE_APP
from sshfwup.supervisor import AppSource, Supervisor, SwapFailed

REPO = Path(__file__).resolve().parents[1]
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
        restart_backoff=(0.1, 2.0),
        user="",
        handoff=True,
        handoff_timeout=3.0,
    )
    return replace(base, **overrides)


@dataclass
class StreamClient:
    """One GET /stream connection: the lines it read, and whether the server closed it."""

    port: int
    lines: list[tuple[int, str]] = field(default_factory=list)
    closed = False

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with await anyio.connect_tcp("127.0.0.1", self.port) as conn:
            await conn.send(b"GET /stream?interval=0.01 HTTP/1.1\r\nHost: device\r\n\r\n")
            buffer = b""
            started = False
            while True:
                try:
                    buffer += await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    self.closed = True
                    return
                if not started and b"\r\n\r\n" in buffer:
                    head, _, buffer = buffer.partition(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 200"), head
                    started = True
                    task_status.started()
                while started and b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    seq, _, version = line.decode().partition(" ")
                    self.lines.append((int(seq), version))

    def versions(self) -> list[str]:
        """The versions that sent the lines, in order, each once per run."""
        runs: list[str] = []
        for _, version in self.lines:
            if not runs or runs[-1] != version:
                runs.append(version)
        return runs

    def assert_unbroken(self) -> None:
        sequence = [seq for seq, _ in self.lines]
        assert sequence == list(range(len(sequence))), f"gap or repeat: {_first_break(sequence)}"


def _first_break(sequence: list[int]) -> str:
    for index, seq in enumerate(sequence):
        if seq != index:
            return f"line {index} is {seq}: ...{sequence[max(0, index - 3) : index + 3]}"
    return "none"


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
async def streaming(sup: Supervisor, count: int) -> AsyncIterator[list[StreamClient]]:
    port = sup.sockets[0].sock.getsockname()[1]
    clients = [StreamClient(port) for _ in range(count)]
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
        client.assert_unbroken()
        assert client.versions() == ["1.0.0", "2.0.0"]
    assert result.handoff.startswith("3 connections, ") and result.handoff.endswith(" of state")
    assert any(line.startswith("2.0.0 took over 3 connections") for line in lines), lines


async def test_a_refused_state_version_falls_back_to_the_drain(tmp_path: Path, marker: str) -> None:
    v1, v2 = install(tmp_path, "a", "1.0.0"), install(tmp_path, "b", "2.0.0", handoff_accept=[2])
    lines: list[str] = []
    async with running(config(), marker, v1) as (sup, port):
        await count(port)
        async with streaming(sup, 2) as clients:
            result = await sup.swap(v2, report=lines.append)
        assert await count(port) == 1  # 2.0.0 started clean
    assert "2.0.0 refused state version 1" in result.handoff
    assert "no hand-off: 2.0.0 refused state version 1" in "\n".join(lines)
    for client in clients:
        assert client.closed and client.versions() == ["1.0.0"]  # ended by 1.0.0's drain, as without hand-off
        client.assert_unbroken()


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
        client.assert_unbroken()
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
