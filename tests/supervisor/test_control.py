"""The local protocol between the supervisor and the SSH front (supervisor/control.py and
supervisor/client.py), in one process over a real socket pair: requests and their answers, bad
messages, another protocol version, a request that never comes, descriptors passed along."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from sshfwup.supervisor import control
from sshfwup.supervisor.client import SupervisorClient, SupervisorGone
from sshfwup.supervisor.control import MAX_LINE, VERSION, ControlServer, OrphanedSwap
from sshfwup.supervisor.errors import SwapFailed
from sshfwup.supervisor.instance import AppSource
from sshfwup.supervisor.logring import LogRing

@dataclass
class Owner:
    """The device as the control server reads it (a stand-in: no boot env, no app)."""

    supervisor: Any = None
    last_outcome: dict[str, Any] | None = None
    last_outcome_at: float = 0.0
    instance: str = "abc123"
    started: float = 1000.0
    logs: LogRing = field(default_factory=LogRing)
    rebooting: str | None = None
    notified: list[str] = field(default_factory=list)

    def notify_status(self, text: str) -> None:
        self.notified.append(text)


async def raw_request(front_end: socket.socket, payload: bytes, fds: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """Send ``payload`` as a request the way the front does (a socket pair over the control
    channel) and read every answer line until the supervisor closes it."""
    ours, theirs = socket.socketpair()
    socket.send_fds(front_end, [b"R"], [theirs.fileno(), *fds])
    theirs.close()
    ours.setblocking(False)
    with ours:
        if payload:
            ours.sendall(payload)
        data = b""
        with anyio.fail_after(15):
            while True:
                await anyio.wait_readable(ours)
                chunk = ours.recv(65536)
                if not chunk:
                    break
                data += chunk
    return [json.loads(line) for line in data.splitlines()]


class Link:
    def __init__(self, owner: Owner, orphans: list[OrphanedSwap]) -> None:
        self.front, self.supervisor_end = socket.socketpair()

        async def record(orphan: OrphanedSwap) -> None:
            orphans.append(orphan)

        self.server = ControlServer(owner, on_orphaned_swap=record)


@asynccontextmanager
async def serving() -> AsyncIterator[Any]:
    """A control server on one end of a socket pair (the supervisor), the other end the front's."""
    owner, orphans = Owner(), []
    lk = Link(owner, orphans)
    lk.owner, lk.orphans = owner, orphans  # type: ignore[attr-defined]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lk.server.serve, lk.supervisor_end, tg)
            yield lk
            tg.cancel_scope.cancel()
    finally:
        lk.front.close()
        lk.supervisor_end.close()


async def test_hello_and_state() -> None:
    async with serving() as link:
        client = SupervisorClient(link.front)
        hello = await client.hello()
        assert hello["ok"] and hello["instance"] == "abc123" and hello["pid"] == os.getpid()
        link.owner.last_outcome = {"ok": True, "verdict": "fine"}
        link.owner.rebooting = "because"
        state = await client.state()
        assert state["app"] is None and state["last_outcome"] == {"ok": True, "verdict": "fine"}
        assert state["rebooting"] == "because"
        await client.notify("uploading")
        assert link.owner.notified == ["uploading"]


@pytest.mark.parametrize(
    "payload, error",
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "expected a JSON object, found list"),
        (json.dumps({"v": VERSION + 1, "op": "state"}).encode() + b"\n", f"protocol version {VERSION + 1} is not spoken here"),
        (json.dumps({"op": "state"}).encode() + b"\n", "protocol version None is not spoken here"),
        (json.dumps({"v": VERSION, "op": "format-disk"}).encode() + b"\n", "unknown op 'format-disk'"),
        (b"x" * (MAX_LINE + 10), "a line longer than"),
        (json.dumps({"v": VERSION, "op": "swap", "root": "/x", "slot": "", "version": "2"}).encode() + b"\n",
         "'slot' must be a non-empty string"),
        (json.dumps({"v": VERSION, "op": "swap", "root": "/x", "slot": "b", "version": "2"}).encode() + b"\n",
         "no application is supervised"),
    ],
)
async def test_a_bad_request_is_refused_and_the_next_one_served(payload: bytes, error: str) -> None:
    async with serving() as link:
        answers = await raw_request(link.front, payload)
        assert len(answers) == 1 and answers[0]["ok"] is False and error in answers[0]["error"], answers
        assert (await SupervisorClient(link.front).hello())["ok"]  # the supervisor goes on


async def test_another_version_is_an_error_for_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as link:
        import sshfwup.supervisor.client as client_module

        monkeypatch.setattr(client_module, "VERSION", VERSION + 1)
        with pytest.raises(SupervisorGone, match=f"protocol version {VERSION + 1} is not spoken here"):
            await SupervisorClient(link.front).hello()


async def test_a_request_that_never_comes_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving() as link:
        monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.3)
        assert await raw_request(link.front, b"") == []  # closed without an answer, after the timeout
        assert (await SupervisorClient(link.front).hello())["ok"]


async def test_descriptors_of_a_refused_request_are_closed() -> None:
    async with serving() as link:
        r, w = os.pipe()
        try:
            await raw_request(link.front, b"nonsense\n", fds=(w,))
            os.close(w)
            with anyio.fail_after(5):
                while True:  # the supervisor's copy of the write end is gone: EOF
                    await anyio.wait_readable(r)
                    assert os.read(r, 1) == b""
                    break
        finally:
            os.close(r)


class SlowSupervisor:
    """Swaps in 0.5 s, saying one line first (a stand-in for the real Supervisor.swap)."""

    current = None
    outage = None
    last_exit = None

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.swapped: list[AppSource] = []

    async def swap(self, source: AppSource, *, report: Any = None) -> Any:
        if report is not None:
            await report("starting")
        await anyio.sleep(0.5)
        self.swapped.append(source)
        if self.fail:
            raise SwapFailed("it crashed", rollback="1.0.0 serves", new_pid=None, restored=None)

        class Result:
            ready_at = 12.5
            handoff = "handed over 1 connection"

        return Result()


async def test_swap_reports_lines_and_its_ending() -> None:
    async with serving() as link:
        link.owner.supervisor = SlowSupervisor()
        lines: list[str] = []

        async def report(line: str) -> None:
            lines.append(line)

        answer = await SupervisorClient(link.front).swap(AppSource(anyio.Path("/x"), "b", "2.0.0"), report=report)  # type: ignore[arg-type]
        assert lines == ["starting"] and answer.ready_at == 12.5 and answer.handoff == "handed over 1 connection"
        assert link.orphans == []
        link.owner.supervisor = SlowSupervisor(fail=True)
        with pytest.raises(SwapFailed, match="it crashed; 1.0.0 serves"):
            await SupervisorClient(link.front).swap(AppSource(anyio.Path("/x"), "b", "2.0.0"))  # type: ignore[arg-type]


@pytest.mark.parametrize("fail", [False, True])
async def test_a_swap_outlives_its_front_and_keeps_the_lock_until_recorded(fail: bool, tmp_path: Any) -> None:
    """The front dies mid-swap: the swap completes (or rolls back), the ending is handed to
    on_orphaned_swap, and only then is the supervisor's copy of the lock closed."""
    async with serving() as link:
        import fcntl

        sup = SlowSupervisor(fail=fail)
        link.owner.supervisor = sup
        lock_path = tmp_path / "update.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ours, theirs = socket.socketpair()
        socket.send_fds(link.front, [b"R"], [theirs.fileno(), fd])
        theirs.close()
        ours.sendall(json.dumps({"v": VERSION, "op": "swap", "root": "/x", "slot": "b", "version": "2.0.0"}).encode() + b"\n")
        await anyio.sleep(0.1)
        ours.close()  # the front dies mid-swap: its request end and its lock descriptor are gone
        os.close(fd)

        def locked() -> bool:
            probe = os.open(lock_path, os.O_RDWR)
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(probe)

        assert locked(), "the supervisor's copy of the lock must hold it while the swap runs"
        with anyio.fail_after(5):
            while not link.orphans:
                await anyio.sleep(0.05)
        assert link.orphans[0].swapped is (not fail) and link.orphans[0].source.slot == "b"
        with anyio.fail_after(5):
            while locked():
                await anyio.sleep(0.05)
        assert len(sup.swapped) == 1


async def test_the_control_channel_closing_ends_serve() -> None:
    front, supervisor_end = socket.socketpair()
    server = ControlServer(Owner(), on_orphaned_swap=lambda orphan: anyio.sleep(0))  # type: ignore[arg-type,return-value]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            front.close()
            await server.serve(supervisor_end, tg)
    supervisor_end.close()


async def test_logs_are_mirrored() -> None:
    async with serving() as link:
        link.owner.logs.append("first line")
        mirror = LogRing()
        async with anyio.create_task_group() as tg:
            tg.start_soon(SupervisorClient(link.front).mirror_logs, mirror)
            with anyio.fail_after(5):
                while [line.text for line in mirror.tail()] != ["first line"]:
                    await anyio.sleep(0.02)
                link.owner.logs.append("second line")
                while [line.text for line in mirror.tail()] != ["first line", "second line"]:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
