"""sshfwup.supervisor.supervisor with real processes and real sockets on 127.0.0.1.

The app under test is tests/apps/http_app.py, installed into one fake root filesystem per
"firmware version" (root/srv/app/{server.py,VERSION,mode.json}); its mode.json makes a version
misbehave the way a broken release would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from apps import stock
from httpload import Load, Response, get

from sshfwup.config import AppConfig, SocketSpec
from sshfwup.supervisor.supervisor import (
    AppNotReady,
    AppSource,
    Instance,
    Supervisor,
    SupervisorError,
    SwapFailed,
    kill_strays,
    marked_processes,
)

APPS = Path(__file__).resolve().parents[1] / "apps"
TEST_TIMEOUT = 30  # a hang fails the test instead of stalling the suite


# --- fixtures and helpers ------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    with anyio.move_on_after(timeout):
        while alive(pid):
            await anyio.sleep(0.02)
    return not alive(pid)


def install_app(tmp_path: Path, slot: str, version: str, **mode: Any) -> AppSource:
    root = tmp_path / f"rootfs-{slot}-{version}"
    app_dir = root / "srv" / "app"
    app_dir.mkdir(parents=True)
    shutil.copy(APPS / "http_app.py", app_dir / "server.py")
    (app_dir / "VERSION").write_text(version)
    if mode:
        (app_dir / "mode.json").write_text(json.dumps(mode))
    return AppSource(root, slot, version)


def app_config(tmp_path: Path, **overrides: Any) -> AppConfig:
    config = AppConfig(
        command=(sys.executable, "{app_dir}/server.py"),
        app_dir="/srv/app",
        env=(("APP_EVENTS", str(tmp_path / "events.log")),),
        sockets=(SocketSpec("tcp", "127.0.0.1", 0, "web"),),
        ready="notify",
        ready_timeout=5.0,
        drain_timeout=5.0,
        observe=0.3,
        health_interval=0.1,
        stall_timeout=1.0,  # the default 5 s would only make the stop-accepting tests slower
        restart_backoff=(0.1, 2.0),
        user="",  # the test apps write into tmp_path; the user switch is tested in test_room.py
    )
    return replace(config, **overrides)


def app_events(tmp_path: Path) -> list[tuple[int, str]]:
    path = tmp_path / "events.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(pid), text) for pid, _, text in (line.partition(" ") for line in lines)]


@asynccontextmanager
async def supervising(config: AppConfig, marker: str, events: list[str] | None = None) -> AsyncIterator[Supervisor]:
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(config, marker=marker, on_event=events.append if events is not None else None) as sup:
            yield sup


def port_of(sup: Supervisor, name: str = "web") -> int:
    return next(s for s in sup.sockets if s.name == name).sock.getsockname()[1]


async def swap_under_load(sup: Supervisor, source: AppSource, **kwargs: Any) -> tuple[Any, Load, float]:
    load = Load(port_of(sup))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(load.run)
        await anyio.sleep(0.3)
        try:
            result = await sup.swap(source, **kwargs)
        finally:
            swapped = time.monotonic()
            await anyio.sleep(0.3)
            load.running = False
    return result, load, swapped


# --- the LISTEN_* convention ---------------------------------------------------------------


async def test_app_sees_sockets_at_fd3_with_its_own_listen_pid(tmp_path: Path, marker: str) -> None:
    unix_path = tmp_path / "admin.sock"
    config = app_config(
        tmp_path,
        ready="http",
        sockets=(SocketSpec("tcp", "127.0.0.1", 0, "web"), SocketSpec("unix", str(unix_path), 0, "admin")),
        env=(("APP_EVENTS", str(tmp_path / "events.log")), ("APP_DATA", "{root}/data")),
    )
    source = install_app(tmp_path, "a", "1.0.0")
    async with supervising(config, marker) as sup:
        instance = await sup.start(source)
        info = json.loads((await get(port_of(sup), "/info")).body)
        via_unix = json.loads((await get(0, "/info", unix=str(unix_path))).body)
        assert [s.address for s in sup.sockets] == [f"tcp:127.0.0.1:{port_of(sup)}", f"unix:{unix_path}"]
        assert [s.path for s in sup.sockets] == [stock.expected_socket_path(), "shared"]

    assert via_unix["pid"] == info["pid"] == instance.pid
    assert info["LISTEN_PID"] == str(instance.pid)
    assert info["LISTEN_FDS"] == "3"
    assert info["LISTEN_FDNAMES"] == "web:admin:health"
    assert [(s["name"], s["fd"], s["family"]) for s in info["sockets"]] == [
        ("web", 3, "AF_INET"),
        ("admin", 4, "AF_UNIX"),
        ("health", 5, "AF_INET"),
    ]
    assert info["env_after_listen_sockets"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    app_dir = tmp_path / "rootfs-a-1.0.0" / "srv" / "app"
    assert info["cwd"] == str(app_dir)
    assert str(app_dir) in info["sys_path"]  # PYTHONPATH starts with the app dir
    env = info["env"]
    assert env["SSHFWUP_SLOT"] == "a" and env["SSHFWUP_VERSION"] == "1.0.0"
    assert env["SSHFWUP_APP_ROOT"] == str(tmp_path / "rootfs-a-1.0.0")
    assert env["SSHFWUP_SUPERVISOR"] == marker
    assert env["APP_DATA"] == str(tmp_path / "rootfs-a-1.0.0" / "data")
    assert info["NOTIFY_SOCKET"].startswith("@sshfwup-notify-")
    assert not unix_path.exists()  # the socket file goes with the supervisor


def test_a_stale_unix_socket_is_replaced_but_other_files_are_not(tmp_path: Path) -> None:
    from sshfwup.supervisor.supervisor import bind_listeners

    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as old:
        old.bind(str(stale))  # closed without unlinking: what a crashed server leaves
    (listener,) = bind_listeners((SocketSpec("unix", str(stale), 0, "s"),))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(stale))
        with pytest.raises(SupervisorError, match="another process is listening"):
            bind_listeners((SocketSpec("unix", str(stale), 0, "s"),))
    finally:
        listener.sock.close()
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(SupervisorError, match="exists and is not a socket"):
        bind_listeners((SocketSpec("unix", str(regular), 0, "s"),))
    assert regular.read_text() == "keep me"


# --- overlap swap ----------------------------------------------------------------------------


async def test_overlap_swap_under_load_refuses_nothing(tmp_path: Path, marker: str) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    lines: list[str] = []
    async with supervising(app_config(tmp_path), marker) as sup:
        old = await sup.start(v1)
        result, load, swapped = await swap_under_load(sup, v2, report=lines.append)
        assert sup.current is not None and sup.current.pid == result.new_pid

    assert load.failures == []
    assert len(load.answers) >= 150, f"the load was too thin to prove anything: {len(load.answers)}"
    versions = [version for _, version in load.answers]
    assert "1.0.0" in versions and "2.0.0" in versions
    assert {version for began, version in load.answers if began > swapped} == {"2.0.0"}
    assert (result.old_pid, result.old_version, result.new_version) == (old.pid, "1.0.0", "2.0.0")
    assert result.old_returncode == 0
    assert 0 < result.ready_seconds < result.total_seconds
    events = app_events(tmp_path)
    assert (old.pid, "sigterm") in events and (old.pid, "exit") in events
    assert not alive(old.pid)
    assert any(line.startswith("new version 2.0.0 ready in ") for line in lines)
    assert any(line.startswith("old version 1.0.0 drained in ") for line in lines)


async def test_drain_lets_an_in_flight_request_finish(tmp_path: Path, marker: str) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    async with supervising(app_config(tmp_path), marker) as sup:
        old = await sup.start(v1)
        port = port_of(sup)
        slow: list[Response] = []

        async def slow_request() -> None:
            slow.append(await get(port, "/slow?1.5"))

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(slow_request)
            while (old.pid, "slow-begin") not in app_events(tmp_path):
                await anyio.sleep(0.01)
            result = await sup.swap(v2)
        assert (await get(port)).body.startswith("2.0.0 ")

    assert slow[0].status == 200 and slow[0].body == f"1.0.0 {old.pid}"
    # SIGTERM came after the start and the hand-over (~0.5 s), with the slow request ~1 s to go
    assert result.drain_seconds >= 0.4
    assert result.old_returncode == 0
    events = app_events(tmp_path)
    assert events.index((old.pid, "sigterm")) < events.index((old.pid, "slow-end")) < events.index((old.pid, "exit"))


async def test_an_app_ignoring_sigterm_is_killed_after_the_drain_timeout(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0", ignore_sigterm=True)
    v2 = install_app(tmp_path, "b", "2.0.0")
    lines: list[str] = []
    async with supervising(app_config(tmp_path, drain_timeout=0.5), marker) as sup:
        old = await sup.start(v1)
        result = await sup.swap(v2, report=lines.append)
        assert (await get(port_of(sup))).body.startswith("2.0.0 ")

    assert result.old_returncode == -signal.SIGKILL
    assert 0.5 <= result.drain_seconds < 3
    assert (old.pid, "sigterm") in app_events(tmp_path)
    assert "old version 1.0.0 did not stop within 0.5 s of SIGTERM: killed" in lines
    assert not alive(old.pid)


async def test_stop_first_swap_serves_again_once_the_new_version_is_ready(tmp_path: Path, marker: str) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    async with supervising(app_config(tmp_path, strategy="stop-first"), marker) as sup:
        old = await sup.start(v1)
        result, load, swapped = await swap_under_load(sup, v2)

    assert result.strategy == "stop-first" and result.new_version == "2.0.0"
    # Connections that arrive in the gap wait in the listen queue; none may fail.
    assert load.failures == []
    assert {version for began, version in load.answers if began > swapped} == {"2.0.0"}
    events = app_events(tmp_path)
    assert events.index((old.pid, "exit")) < events.index((result.new_pid, "start"))


async def test_a_failing_progress_report_does_not_stop_the_swap(tmp_path: Path, marker: str) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    seen: list[str] = []

    async def broken_channel(line: str) -> None:
        seen.append(line)
        raise BrokenPipeError("the uploader went away")

    async with supervising(app_config(tmp_path), marker) as sup:
        await sup.start(v1)
        result = await sup.swap(v2, report=broken_channel)
        assert (await get(port_of(sup))).body == f"2.0.0 {result.new_pid}"
    assert len(seen) >= 4  # every stage was still offered to the reporter


async def test_a_cancelled_swap_leaves_the_old_version_serving(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", startup_delay=5)
    async with supervising(app_config(tmp_path, ready_timeout=10), marker) as sup:
        old = await sup.start(v1)
        with anyio.move_on_after(0.5):
            await sup.swap(v2)
        assert sup.current is not None and sup.current.pid == old.pid
        assert (await get(port_of(sup))).body == f"1.0.0 {old.pid}"
        new_pids = [pid for pid, text in app_events(tmp_path) if text == "start" and pid != old.pid]
        assert len(new_pids) == 1 and not alive(new_pids[0])


# --- the hand-over (socket paths) -----------------------------------------------------------


async def test_the_old_version_gets_no_new_connection_once_the_new_one_is_ready(
    tmp_path: Path, marker: str
) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    lines: list[tuple[float, str]] = []
    answers: list[tuple[float, str]] = []
    running = [True]
    async with supervising(app_config(tmp_path), marker) as sup:
        old = await sup.start(v1)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stock.fresh_requests, port_of(sup), answers, running)
            await anyio.sleep(0.2)
            result = await sup.swap(v2, report=lambda line: lines.append((time.monotonic(), line)))
            running[0] = False

    assert result.socket_path == stock.expected_socket_path()
    steered_at = next(at for at, line in lines if line.startswith("new connections go to 2.0.0 now"))
    drained_at = next(at for at, line in lines if line.startswith("old version 1.0.0 drained in"))
    assert result.handover_seconds >= 0.25  # the quiet period before SIGTERM
    during = [version for began, version in answers if steered_at < began < drained_at]
    assert len(during) >= 5, f"too few requests during the hand-over to prove anything: {during}"
    assert {version for began, version in answers if began > steered_at} == {"2.0.0"}
    assert "1.0.0" in {version for began, version in answers if began < steered_at}
    events = app_events(tmp_path)
    assert (old.pid, "sigterm") in events and not alive(old.pid)


async def test_without_steering_both_versions_share_one_socket(tmp_path: Path, marker: str) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    lines: list[str] = []
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(app_config(tmp_path), marker=marker, steer=False) as sup:
            (listener,) = sup.sockets
            shared = listener.sock
            await sup.start(v1)
            result, load, swapped = await swap_under_load(sup, v2, report=lines.append)
            assert listener.sock is shared and listener.members == (shared,)

    assert (result.socket_path, result.handover_seconds) == ("shared", 0.0)
    assert any(line.endswith("(overlap); socket path shared") for line in lines)
    assert not any(line.startswith("new connections") for line in lines)
    assert load.failures == []
    assert {version for began, version in load.answers if began > swapped} == {"2.0.0"}


async def test_a_swap_leaves_one_socket_per_address_behind(tmp_path: Path, marker: str) -> None:
    v1, v2 = install_app(tmp_path, "a", "1.0.0"), install_app(tmp_path, "b", "2.0.0")
    async with supervising(app_config(tmp_path), marker) as sup:
        (listener,) = sup.sockets
        first = listener.sock
        port = port_of(sup)
        await sup.start(v1)
        await sup.swap(v2)
        assert len(listener.members) == 1 and listener.sock is not first
        assert first.fileno() == -1  # released: closed, out of the group
        await sup.swap(v1)
        assert len(listener.members) == 1
        assert (await get(port)).body.startswith("1.0.0 ")


async def test_a_new_version_dying_during_the_hand_over_gives_new_connections_back(
    tmp_path: Path, marker: str
) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", exit_after=[0.05, 3])  # within the quiet period
    async with supervising(app_config(tmp_path), marker) as sup:
        old = await sup.start(v1)
        (listener,) = sup.sockets
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert failure.value.reason == "2.0.0 exited with status 3 while taking over new connections"
        assert failure.value.rollback == f"1.0.0 is still serving (pid {old.pid})"
        assert sup.current is not None and sup.current.pid == old.pid
        assert listener.members == (listener.sock,)
        for _ in range(5):  # new connections reach the old version again
            assert (await get(port_of(sup))).body == f"1.0.0 {old.pid}"
        assert (old.pid, "sigterm") not in app_events(tmp_path)


# --- processes an instance leaves behind ---------------------------------------------------


async def test_a_leftover_that_exits_by_itself_gets_the_drain_time_and_is_waited_for(
    tmp_path: Path, marker: str, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0", leave_behind=0.6)
    v2 = install_app(tmp_path, "b", "2.0.0")
    caplog.set_level(logging.DEBUG, logger="sshfwup.supervisor.supervisor")
    async with supervising(app_config(tmp_path, drain_timeout=5.0, observe=0), marker) as sup:
        old = await sup.start(v1)
        result = await sup.swap(v2)
        (helper,) = [int(text.split()[1]) for pid, text in app_events(tmp_path) if text.startswith("left ")]
        # the swap's drain lasted the helper's lifetime (asserted below); under heavy load its exit
        # may still be settling in /proc for a moment
        assert await wait_gone(helper, 2.0)
        assert marked_processes(marker) == [result.new_pid]

    assert result.old_returncode == 0 and result.drain_seconds >= 0.6
    # Logged once at debug level — or not at all when it was gone by the time the sweep looked (the
    # supervisor also waits for the app's output pipe, which the helper held until it exited).
    about_helper = [r for r in caplog.records if r.name == "sshfwup.supervisor.supervisor" and f"[{helper}]" in r.getMessage()]
    assert len(about_helper) <= 1 and all(r.levelno == logging.DEBUG for r in about_helper)
    assert all(f"1.0.0 (pid {old.pid}) left [{helper}]; they exited within " in r.getMessage() for r in about_helper)


async def test_a_leftover_that_stays_is_killed_at_the_end_of_the_drain_time(
    tmp_path: Path, marker: str, caplog: pytest.LogCaptureFixture
) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0", leave_behind=60)
    v2 = install_app(tmp_path, "b", "2.0.0")
    async with supervising(app_config(tmp_path, drain_timeout=1.0, observe=0), marker) as sup:
        await sup.start(v1)
        result = await sup.swap(v2)
        (helper,) = [int(text.split()[1]) for pid, text in app_events(tmp_path) if text.startswith("left ")]
        assert not alive(helper)

    assert result.old_returncode == 0  # the app itself drained; only its helper was killed
    assert 1.0 <= result.drain_seconds < 3.0
    warnings = [r.getMessage() for r in caplog.records if r.name == "sshfwup.supervisor.supervisor" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"killed [{helper}]" in warnings[0]


# --- rollback --------------------------------------------------------------------------------


async def test_new_version_never_ready_leaves_the_old_one_serving(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", ready="never")
    async with supervising(app_config(tmp_path, ready_timeout=1.0), marker) as sup:
        old = await sup.start(v1)
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert failure.value.reason == "2.0.0 did not become ready within 1 s"
        assert failure.value.rollback == f"1.0.0 is still serving (pid {old.pid})"
        assert sup.current is not None and sup.current.pid == old.pid
        assert (await get(port_of(sup))).body == f"1.0.0 {old.pid}"
        assert failure.value.new_pid and not alive(failure.value.new_pid)


async def test_new_version_exiting_during_observation_brings_the_old_one_back(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", exit_after=[0.8, 3])  # after the hand-over and the drain
    async with supervising(app_config(tmp_path, observe=2.0), marker) as sup:
        old = await sup.start(v1)
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert failure.value.reason == "2.0.0 exited with status 3 during the observation window"
        restored = failure.value.restored
        assert restored is not None and restored.version == "1.0.0" and restored.pid != old.pid
        assert sup.current is not None and sup.current.pid == restored.pid
        assert (await get(port_of(sup))).body == f"1.0.0 {restored.pid}"
        assert failure.value.new_pid and not alive(failure.value.new_pid)


async def test_failing_http_health_check_during_observation_rolls_back(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", health_fail_after=0.3)
    async with supervising(app_config(tmp_path, ready="http", observe=1.5), marker) as sup:
        await sup.start(v1)
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert failure.value.reason == "2.0.0 failed its health check (HTTP 500) during the observation window"
        assert (await get(port_of(sup))).body.startswith("1.0.0 ")
        new_pid = failure.value.new_pid
    assert (new_pid, "health") in app_events(tmp_path)  # the probes reached the new instance


@pytest.mark.parametrize("ready", ["http", "tcp"])
async def test_readiness_probes_reach_the_new_instance_not_the_old_one(
    tmp_path: Path, marker: str, ready: str
) -> None:
    """The old version answers everything on the shared socket; a probe sent there would pass.
    The new version never serves: only a probe on its private socket sees that."""
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", ready="never")
    async with supervising(app_config(tmp_path, ready=ready, ready_timeout=1.0), marker) as sup:
        old = await sup.start(v1)
        probes_of_old = app_events(tmp_path).count((old.pid, "health"))
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert failure.value.reason.startswith("2.0.0 did not become ready within 1 s")
        assert sup.current is not None and sup.current.pid == old.pid
        assert app_events(tmp_path).count((old.pid, "health")) == probes_of_old


async def test_an_old_version_that_crashes_during_a_swap_belongs_to_the_swap(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", startup_delay=0.5)
    events: list[str] = []
    async with supervising(app_config(tmp_path), marker, events) as sup:
        old = await sup.start(v1)
        async with anyio.create_task_group() as tasks:

            async def crash_old_while_new_starts() -> None:
                await anyio.sleep(0.2)
                os.kill(old.pid, signal.SIGKILL)

            tasks.start_soon(crash_old_while_new_starts)
            result = await sup.swap(v2)
        await anyio.sleep(0.5)  # a restart loop, if one had been started, would have acted by now
        assert sup.current is not None and sup.current.pid == result.new_pid

    assert result.old_returncode == -signal.SIGKILL
    assert not any("restarting" in event for event in events)
    assert [pid for pid, text in app_events(tmp_path) if text == "start"] == [old.pid, result.new_pid]


# --- health is proved on the public sockets ----------------------------------------------------


@pytest.mark.parametrize("ready", ["notify", "tcp", "http"])
async def test_an_app_serving_a_port_of_its_own_is_not_ready_whatever_it_says(
    tmp_path: Path, marker: str, ready: str
) -> None:
    """The issue's reproduction: READY=1 (or a passing private probe), but the public port hangs."""
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", own_port=True)
    async with supervising(app_config(tmp_path, ready=ready, ready_timeout=1.0), marker) as sup:
        old = await sup.start(v1)
        port = port_of(sup)
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert sup.current is not None and sup.current.pid == old.pid
        assert (await get(port)).body == f"1.0.0 {old.pid}"
        new_pid = failure.value.new_pid
        assert new_pid and not alive(new_pid)
        assert (new_pid, "ready") in app_events(tmp_path)  # it did say so
        assert (old.pid, "sigterm") not in app_events(tmp_path)  # refused before the hand-over
    reason = failure.value.reason
    if ready == "http":  # the readiness probe itself goes through the public socket
        assert reason == (
            f"2.0.0 did not become ready within 1 s (no answer to GET /health through its public socket web"
            f" (tcp:127.0.0.1:{port}))"
        )
    else:
        announced = "said READY=1" if ready == "notify" else "passed its readiness probe"
        assert re.fullmatch(
            rf"2\.0\.0 did not become ready within 1 s: it {announced} after \d+\.\d\d s, but accepted no"
            rf" connection on its public socket web \(tcp:127\.0\.0\.1:{port}\) — an app must serve"
            r" the sockets it is given \(LISTEN_FDS\), not listen on its own",
            reason,
        ), reason


async def test_an_app_serving_a_port_of_its_own_does_not_start(tmp_path: Path, marker: str) -> None:
    async with supervising(app_config(tmp_path, ready_timeout=1.0), marker) as sup:
        with pytest.raises(AppNotReady, match="accepted no connection on its public socket web"):
            await sup.start(install_app(tmp_path, "a", "1.0.0", own_port=True))
        assert sup.current is None


async def test_on_the_shared_path_the_public_socket_is_proved_once_the_old_version_drained(
    tmp_path: Path, marker: str
) -> None:
    """Both versions accept from one queue during an overlap: no probe can single out the new one
    before the hand-over. Once the old one is gone it can, and a failure brings the old one back."""
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", own_port=True)
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(app_config(tmp_path, observe=0), marker=marker, steer=False) as sup:
            old = await sup.start(v1)
            with pytest.raises(SwapFailed) as failure:
                await sup.swap(v2)
            restored = failure.value.restored
            assert restored is not None and restored.version == "1.0.0" and restored.pid != old.pid
            assert (await get(port_of(sup))).body == f"1.0.0 {restored.pid}"
    assert re.fullmatch(
        r"2\.0\.0 stopped accepting connections on its public socket web \(tcp:127\.0\.0\.1:\d+\): a probe"
        r" connection waited 1 s while nothing was accepted there \(\d+ queued\) once 1\.0\.0 had drained",
        failure.value.reason,
    ), failure.value.reason


async def test_a_notify_app_that_stops_accepting_during_the_observation_window_is_rolled_back(
    tmp_path: Path, marker: str
) -> None:
    """notify readiness used to mean "alive is healthy": a dead accept loop went unnoticed."""
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", stop_accepting_after=0.5)
    async with supervising(app_config(tmp_path, observe=2.5), marker) as sup:
        await sup.start(v1)
        with pytest.raises(SwapFailed) as failure:
            await sup.swap(v2)
        assert failure.value.reason.startswith("2.0.0 stopped accepting connections on its public socket web"), (
            failure.value.reason
        )
        assert failure.value.reason.endswith("during the observation window")
        restored = failure.value.restored
        assert restored is not None and (await get(port_of(sup))).body == f"1.0.0 {restored.pid}"
    assert (failure.value.new_pid, "stopped accepting") in app_events(tmp_path)


async def test_health_now_and_over_a_window(tmp_path: Path, marker: str) -> None:
    """What boot validation asks: the app is healthy over the window, and still at the moment."""
    async with supervising(app_config(tmp_path), marker) as sup:
        assert await sup.check_health() == "the app is not running"
        await sup.start(install_app(tmp_path, "a", "1.0.0", stop_accepting_after=1.2))
        assert await sup.watch_health(0.5) is None
        assert await sup.check_health() is None
        await anyio.sleep(1.0)
        problem = await sup.check_health()
        assert problem is not None and problem.startswith("1.0.0 stopped accepting connections on its public socket web")
        assert not await sup.wait_healthy(0.5)


# --- a crash loop after a swap -------------------------------------------------------------------


async def test_a_crash_loop_asks_the_handler_which_version_to_start(tmp_path: Path, marker: str) -> None:
    v1 = install_app(tmp_path, "a", "1.0.0")
    v2 = install_app(tmp_path, "b", "2.0.0", exit_after=[1.0, 3])  # after its observation window
    asked: list[tuple[str, int, int | None]] = []
    events: list[str] = []

    async def on_crash_loop(crashed: Instance, crashes: int) -> AppSource | None:
        asked.append((crashed.version, crashes, crashed.returncode))
        return None if len(asked) == 1 else v1  # the first time: keep restarting it

    config = app_config(tmp_path, observe=0.1, restart_backoff=(0.05, 5.0), rollback_after_crashes=2)
    with anyio.fail_after(TEST_TIMEOUT):
        async with Supervisor(config, marker=marker, on_event=events.append, on_crash_loop=on_crash_loop) as sup:
            await sup.start(v1)
            await sup.swap(v2)
            while not (sup.current and sup.current.version == "1.0.0" and sup.current.ready_at):
                await anyio.sleep(0.02)
            back = sup.current
            await anyio.sleep(0.5)
            assert sup.current.pid == back.pid  # it stays: nothing restarts 2.0.0 again
            assert (await get(port_of(sup))).body == f"1.0.0 {back.pid}"

    assert asked == [("2.0.0", 2, 3), ("2.0.0", 3, 3)]
    assert "2.0.0 failed 3 times in a row; starting 1.0.0 from slot a instead" in events
    starts = [pid for pid, text in app_events(tmp_path) if text == "start"]
    assert len(starts) == 5  # 1.0.0, 2.0.0 swapped in, two restarts of it, 1.0.0 again
    assert back.restarts == 0 and back.source == v1


# --- start, crash restart, process lifetime --------------------------------------------------


async def test_start_failures_say_why(tmp_path: Path, marker: str) -> None:
    source = install_app(tmp_path, "a", "1.0.0", exit_after=[0, 0])
    exits_at_once = app_config(tmp_path, command=(sys.executable, "-c", "raise SystemExit(3)"))
    async with supervising(exits_at_once, marker) as sup:
        with pytest.raises(AppNotReady, match=r"^1\.0\.0 exited with status 3 before it became ready$"):
            await sup.start(source)
        assert sup.current is None
    async with supervising(app_config(tmp_path, command=("/nonexistent/app",)), marker) as sup:
        with pytest.raises(AppNotReady) as failure:
            await sup.start(source)
        assert failure.value.reason == (
            "1.0.0 exited with status 127 before it became ready"
            " (cannot run '/nonexistent/app': No such file or directory)"
        )
    async with supervising(app_config(tmp_path, app_dir="/opt/missing"), marker) as sup:
        with pytest.raises(AppNotReady, match="application directory .*/opt/missing does not exist"):
            await sup.start(source)


async def test_a_crashed_app_is_restarted(tmp_path: Path, marker: str) -> None:
    events: list[str] = []
    async with supervising(app_config(tmp_path), marker, events) as sup:
        first = await sup.start(install_app(tmp_path, "a", "1.0.0"))
        os.kill(first.pid, signal.SIGKILL)
        while not (sup.current and sup.current.pid != first.pid and sup.current.ready_at):
            await anyio.sleep(0.02)
        assert sup.current.restarts == 1
        assert (await get(port_of(sup))).body == f"1.0.0 {sup.current.pid}"
        assert await sup.wait_healthy(0.3)
    assert f"1.0.0 (pid {first.pid}) was killed by SIGKILL; restarting in 0.1 s" in events


async def test_repeated_crashes_back_off_exponentially(tmp_path: Path, marker: str) -> None:
    events: list[str] = []
    source = install_app(tmp_path, "a", "1.0.0", exit_after=[0.05, 1])
    async with supervising(app_config(tmp_path, restart_backoff=(0.1, 2.0)), marker, events) as sup:
        first = await sup.start(source)
        while not (sup.current and sup.current.restarts >= 3):
            await anyio.sleep(0.02)
        assert not await sup.wait_healthy(1.0)
    delays = [event.rpartition("restarting in ")[2] for event in events if "restarting in" in event]
    assert delays[:3] == ["0.1 s", "0.2 s", "0.4 s"]
    started = [pid for pid, text in app_events(tmp_path) if text == "start"]
    assert started[0] == first.pid and len(set(started)) == len(started) >= 4


async def test_app_dies_with_the_process_that_supervises_it(tmp_path: Path, marker: str) -> None:
    source = install_app(tmp_path, "a", "1.0.0")
    host = subprocess.Popen(
        [sys.executable, str(APPS / "supervise.py"), marker, str(source.root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert host.stdout is not None
        with anyio.fail_after(TEST_TIMEOUT):
            app_pid = int(await anyio.to_thread.run_sync(host.stdout.readline))
        assert alive(app_pid) and marked_processes(marker) == [app_pid]
        host.kill()  # SIGKILL: the supervisor gets no chance to stop its app
        host.wait()
        assert await wait_gone(app_pid), "the app outlived its supervisor"
    finally:
        host.kill()
        host.wait()


async def test_kill_strays_finds_a_marked_orphan(tmp_path: Path, marker: str) -> None:
    def orphan() -> int:
        # The shell starts sleep in the background and exits: sleep is reparented, an orphan.
        out = subprocess.run(
            ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
            env=dict(os.environ, SSHFWUP_SUPERVISOR=marker), capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(out.stdout)

    stray = orphan()
    assert marked_processes(marker) == [stray]
    assert kill_strays(marker) == [stray]
    assert not alive(stray)
    # A supervisor does the same when it starts.
    stray = orphan()
    async with supervising(app_config(tmp_path), marker):
        assert not alive(stray)


async def test_leaving_the_supervisor_stops_the_app_and_releases_the_port(tmp_path: Path, marker: str) -> None:
    async with supervising(app_config(tmp_path), marker) as sup:
        instance = await sup.start(install_app(tmp_path, "a", "1.0.0"))
        port = port_of(sup)
        with pytest.raises(SupervisorError, match="already runs"):
            await sup.start(install_app(tmp_path, "b", "2.0.0"))
    assert not alive(instance.pid)
    assert (instance.pid, "sigterm") in app_events(tmp_path)
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port is free again


# --- while no version runs: the stand-in, the last exit --------------------------------------

BROKEN_APP = "import sys; print('starting'); print('cannot open the database: /data/app.db'); sys.exit(3)"


async def raw_connection_ends(port: int) -> str:
    """Connect, wait for the other side: "reset" or "closed" (a hang fails the caller's bound)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return "closed" if await reader.read(100) == b"" else "data"
    except ConnectionResetError:
        return "reset"
    finally:
        writer.close()


async def test_while_no_version_runs_the_http_socket_answers_503_with_the_reason_and_others_reset(
    tmp_path: Path, marker: str
) -> None:
    sockets = (SocketSpec("tcp", "127.0.0.1", 0, "http"), SocketSpec("tcp", "127.0.0.1", 0, "raw"))
    broken = app_config(tmp_path, command=(sys.executable, "-c", BROKEN_APP), sockets=sockets, unavailable_after=0.2)
    source = install_app(tmp_path, "a", "1.0.0")
    async with supervising(broken, marker) as sup:
        assert sup.outage is None and sup.last_exit is None
        with pytest.raises(AppNotReady):
            await sup.start(source)
        began = time.monotonic()
        answer = await get(port_of(sup, "http"), timeout=3)  # queued until the stand-in answers
        assert time.monotonic() - began < 2.0
        assert answer.status == 503
        assert answer.body == (
            "503 Service Unavailable: the application is not running (1.0.0 exited with status 3 before it"
            " became ready)\n"
        )
        assert answer.headers["connection"] == "close" and int(answer.headers["retry-after"]) >= 1
        with anyio.fail_after(3):
            assert await raw_connection_ends(port_of(sup, "raw")) == "reset"
        exit_ = sup.last_exit
        assert exit_ is not None and (exit_.version, exit_.exit_code, exit_.signal) == ("1.0.0", 3, None)
        assert exit_.output == ("starting", "cannot open the database: /data/app.db")
        assert abs(exit_.at - time.time()) < 10
        assert sup.outage is not None and sup.outage.reason == exit_.reason

    # a good version: the stand-in stops before it starts, and never answers again while it runs
    good = replace(broken, command=(sys.executable, "{app_dir}/server.py"))
    async with supervising(good, marker) as sup:
        with pytest.raises(AppNotReady):
            await sup.start(install_app(tmp_path, "b", "0.9.0", ready="never"))  # times out: not ready
        assert sup.outage is not None and "did not become ready within 5 s" in sup.outage.reason
        assert (await get(port_of(sup, "http"), timeout=3)).status == 503
        # stopped for it (SIGTERM; it drained and exited 0): the reason is the supervisor's
        assert sup.last_exit is not None and sup.last_exit.reason == "0.9.0 did not become ready within 5 s"
        instance = await sup.start(source)
        assert sup.outage is None
        for _ in range(20):
            assert (await get(port_of(sup, "http"))).body == f"1.0.0 {instance.pid}"


async def test_a_crashed_app_waiting_for_its_restart_is_answered_for_then_serves_again(
    tmp_path: Path, marker: str
) -> None:
    source = install_app(tmp_path, "a", "1.0.0", exit_after=[0.3, 3])
    sockets = (SocketSpec("tcp", "127.0.0.1", 0, "http"),)
    config = app_config(tmp_path, sockets=sockets, restart_backoff=(2.0, 2.0), unavailable_after=0.3, observe=0)
    async with supervising(config, marker) as sup:
        first = await sup.start(source)
        (source.root / "srv/app/mode.json").unlink()  # the restart comes up and stays
        while sup.outage is None:
            await anyio.sleep(0.02)
        answer = await get(port_of(sup, "http"), timeout=3)
        assert answer.status == 503 and "1.0.0 exited with status 3" in answer.body
        assert 1 <= int(answer.headers["retry-after"]) <= 2
        assert sup.last_exit is not None and sup.last_exit.pid == first.pid and sup.last_exit.exit_code == 3
        while not (sup.current and sup.current.pid != first.pid and sup.current.ready_at):
            await anyio.sleep(0.02)
        assert sup.outage is None
        for _ in range(20):
            assert (await get(port_of(sup, "http"))).body == f"1.0.0 {sup.current.pid}"


async def test_a_stopped_app_is_not_answered_for(tmp_path: Path, marker: str) -> None:
    """stop() is on purpose (stop-first swaps, shutdown): connections wait in the queue."""
    config = app_config(tmp_path, sockets=(SocketSpec("tcp", "127.0.0.1", 0, "http"),), unavailable_after=0.1)
    async with supervising(config, marker) as sup:
        await sup.start(install_app(tmp_path, "a", "1.0.0"))
        await sup.stop()
        assert sup.outage is None
        with pytest.raises(TimeoutError):
            await get(port_of(sup, "http"), timeout=0.8)


def test_the_503_answer_is_one_safe_line_with_a_bounded_retry_after() -> None:
    from sshfwup.supervisor.unavailable import response_503

    text = response_503("2.0.0 exited\r\nX-Evil: 1", 0.2).decode()
    head, _, body = text.partition("\r\n\r\n")
    assert head.splitlines()[0] == "HTTP/1.1 503 Service Unavailable"
    assert "X-Evil" not in head and "Retry-After: 1" in head and "Connection: close" in head
    assert body == "503 Service Unavailable: the application is not running (2.0.0 exited  X-Evil: 1)\n"
    assert f"Content-Length: {len(body.encode())}" in head
    assert "Retry-After: 300\r\n" in response_503("x", 10_000).decode()
    assert "Retry-After: 5\r\n" in response_503("x", None).decode()
