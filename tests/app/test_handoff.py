"""sshfwup.app.handoff (wire format, the app's side) and sshfwup.supervisor.handoff_relay (the supervisor's side),
with real SEQPACKET socket pairs, real SCM_RIGHTS and real TCP connections on 127.0.0.1; the two
app sides run in threads, as the two processes would."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest

from sshfwup.app import handoff
from sshfwup.supervisor.handoff_relay import Channel, Limits, Transfer, relay

LIMITS = Limits(max_state=4 * 1024 * 1024, max_sockets=128, timeout=2.0)


@contextmanager
def tcp_pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``count`` established TCP connections on 127.0.0.1: (client, server side) each."""
    pairs: list[tuple[socket.socket, socket.socket]] = []
    with socket.create_server(("127.0.0.1", 0), backlog=count + 1) as server:
        try:
            for _ in range(count):
                client = socket.create_connection(server.getsockname())
                pairs.append((client, server.accept()[0]))
            yield pairs
        finally:
            for client, served in pairs:
                client.close()
                served.close()


@contextmanager
def channels() -> Iterator[tuple[Channel, Channel]]:
    old, new = Channel(), Channel()
    try:
        yield old, new
    finally:
        old.close()
        new.close()


async def run_handoff(
    old: Channel, new: Channel, give: Callable[[], Any], take: Callable[[], Any], *, verdict: bytes | None = None,
    limits: Limits = LIMITS,
) -> tuple[Transfer, Any, Any]:
    """The supervisor's part of a swap: wait for WANT, relay, then settle with the sender."""
    results: dict[str, Any] = {}

    async def in_thread(name: str, fn: Callable[[], Any]) -> None:
        results[name] = await anyio.to_thread.run_sync(fn)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(in_thread, "given", give)
            tasks.start_soon(in_thread, "taken", take)
            from sshfwup.supervisor.handoff_relay import wait_want

            assert await wait_want(new)
            transfer = await relay(old, new, limits, sender_name="1.0", receiver_name="2.0")
            if transfer.taken:  # else the relay told the sender KEEP itself
                old.tell(verdict or handoff.DONE)
    return transfer, results["given"], results["taken"]


def giver(old: Channel, state: bytes, sockets: list[socket.socket], version: int = 1) -> Callable[[], bool]:
    def give() -> bool:
        deadline = time.monotonic() + 10
        while not handoff.asked(via=old.app_end):  # what an event loop does when the fd is readable
            assert time.monotonic() < deadline, "never asked"
            time.sleep(0.005)
        return handoff.send(version, state, sockets, via=old.app_end)

    return give


async def test_state_and_connections_move_and_work() -> None:
    state = os.urandom(1024 * 1024 + 123)  # 1 MiB and more: several DATA messages
    with channels() as (old, new), tcp_pairs(70) as pairs:  # 70 sockets: two SOCK messages
        transfer, given, taken = await run_handoff(
            old, new, giver(old, state, [served for _, served in pairs]), lambda: handoff.receive({1}, via=new.app_end)
        )
        assert transfer.taken and given is True
        assert (transfer.state_version, transfer.state_bytes, transfer.sockets) == (1, len(state), 70)
        assert transfer.summary() == "70 connections, 1.0 MiB of state"
        assert taken.version == 1 and taken.state == state and len(taken.sockets) == 70
        for index, ((client, _), received) in enumerate(zip(pairs, taken.sockets, strict=True)):
            received.sendall(f"{index}\n".encode())
            assert client.recv(16) == f"{index}\n".encode()  # the same connection, in the same order
            received.close()


async def test_a_refused_state_version_keeps_everything_with_the_old_version() -> None:
    with channels() as (old, new), tcp_pairs(2) as pairs:
        transfer, given, taken = await run_handoff(
            old, new, giver(old, b"v1 state", [s for _, s in pairs]), lambda: handoff.receive({2}, via=new.app_end)
        )
        assert not transfer.taken and given is False and taken is None
        assert "2.0 refused state version 1" in transfer.problem
        client, served = pairs[0]
        served.sendall(b"still mine")  # the old version's copy still works; the client never noticed
        assert client.recv(16) == b"still mine"


@pytest.mark.parametrize(
    ("state", "count", "limits", "expected"),
    [
        (b"x" * 2048, 0, Limits(1024, 8, 2.0), "state of 2048 bytes is over the limit of 1024"),
        (b"", 3, Limits(1024, 2, 2.0), "3 sockets are over the limit of 2"),
    ],
)
async def test_bounds_are_enforced_before_anything_moves(
    state: bytes, count: int, limits: Limits, expected: str
) -> None:
    with channels() as (old, new), tcp_pairs(count) as pairs:
        transfer, given, taken = await run_handoff(
            old, new, giver(old, state, [s for _, s in pairs]), lambda: handoff.receive(via=new.app_end), limits=limits
        )
    assert not transfer.taken and given is False and taken is None
    assert expected in transfer.problem and "2.0 starts clean" in transfer.problem


async def test_only_sockets_are_passed_on() -> None:
    read_end, write_end = os.pipe()
    try:
        pipe = socket.socket(fileno=os.dup(read_end))  # not a socket: the relay must say no
    except OSError:
        pipe = None
    with channels() as (old, new):

        def give() -> bool:
            while not handoff.asked(via=old.app_end):
                time.sleep(0.005)
            handoff.send_message(old.app_end, handoff.pack_head(1, 0, 1))
            handoff.send_message(old.app_end, handoff.SOCK, b"", [read_end])
            return handoff.recv_message(old.app_end)[0] == handoff.KEEP

        transfer, kept, taken = await run_handoff(old, new, give, lambda: handoff.receive(via=new.app_end))
    os.close(read_end)
    os.close(write_end)
    if pipe is not None:
        pipe.detach()
    assert not transfer.taken and kept and taken is None
    assert "more sockets were due" in transfer.problem


async def test_the_old_version_dying_mid_hand_off_leaves_the_new_one_clean() -> None:
    with channels() as (old, new):

        def give_and_die() -> bool:
            while not handoff.asked(via=old.app_end):
                time.sleep(0.005)
            handoff.send_message(old.app_end, handoff.pack_head(1, 100_000, 0))
            handoff.send_message(old.app_end, handoff.DATA, b"x" * 1000)
            old.app_end.close()  # the process died: its end closes
            return True

        transfer, _, taken = await run_handoff(old, new, give_and_die, lambda: handoff.receive(via=new.app_end))
    assert not transfer.taken and taken is None
    assert "1.0 closed its channel" in transfer.problem and "2.0 starts clean" in transfer.problem


async def test_a_silent_old_version_costs_at_most_the_timeout() -> None:
    with channels() as (old, new):
        began = time.monotonic()
        transfer, given, taken = await run_handoff(
            old, new, lambda: None, lambda: handoff.receive(via=new.app_end), limits=Limits(1024, 1, 0.5)
        )
    assert time.monotonic() - began < 5
    assert not transfer.taken and taken is None and "1.0 took over 0.5 s sending its state" in transfer.problem


def test_wire_format_is_what_the_docs_say() -> None:
    head = handoff.pack_head(7, 1234, 3)
    assert head == b"HEAD" + struct.pack(">IQI", 7, 1234, 3) and len(head) == 20
    assert handoff.unpack_head(head) == (7, 1234, 3)
    with pytest.raises(handoff.HandoffProtocolError, match="expected a HEAD"):
        handoff.unpack_head(b"HEAD\0\0")
    with pytest.raises(handoff.HandoffProtocolError, match="unknown message"):
        handoff.split_message(b"EVIL payload")
    assert handoff.describe(1229, 3) == "3 connections, 1.2 KiB of state"
    assert handoff.describe(10, 1) == "1 connection, 10 B of state"


def test_an_oversized_message_is_a_protocol_error() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(b"DATA" + b"x" * handoff.MAX_MESSAGE)
        with pytest.raises(handoff.HandoffProtocolError, match="cut by the kernel"):
            handoff.recv_message(b)


def test_without_a_channel_the_app_starts_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(handoff.ENV_FD, raising=False)
    monkeypatch.setattr(handoff, "_channel_read", False)
    monkeypatch.setattr(handoff, "_channel", None)
    from sshfwup import app

    assert app.handoff is handoff
    assert not handoff.available() and handoff.receive() is None and handoff.send(1, b"", []) is False
    assert handoff.asked() is False and handoff.fileno() == -1


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([b"EVIL"], "unexpected message"),
        ([b"HEAD\0\0"], "expected a HEAD"),
        ([handoff.pack_head(1, 4, 0), handoff.DATA + b"12345"], "4 more bytes of state"),
        ([handoff.pack_head(1, 4, 0), handoff.GIVE], "unexpected message"),
    ],
)
async def test_a_sender_breaking_the_protocol_moves_nothing(messages: list[bytes], expected: str) -> None:
    with channels() as (old, new):

        def give() -> bytes:
            while not handoff.asked(via=old.app_end):
                time.sleep(0.005)
            for message in messages:
                old.app_end.send(message)
            return handoff.recv_message(old.app_end)[0]

        transfer, answer, taken = await run_handoff(old, new, give, lambda: handoff.receive(via=new.app_end))
    assert not transfer.taken and taken is None and answer == handoff.KEEP
    assert expected in transfer.problem and "2.0 starts clean" in transfer.problem


async def test_a_code_change_that_fails_refuses_the_hand_off() -> None:
    def code_change(version: int, state: bytes, sockets: list[socket.socket]) -> Any:
        raise ValueError("no field 'count'")

    with channels() as (old, new), tcp_pairs(1) as pairs:
        transfer, given, taken = await run_handoff(
            old, new, giver(old, b"{}", [pairs[0][1]]), lambda: handoff.receive(upgrade=code_change, via=new.app_end)
        )
    assert not transfer.taken and given is False and taken is None
    assert "refused state version 1 (cannot use state version 1: no field 'count')" in transfer.problem


async def test_a_code_change_result_comes_with_what_was_taken() -> None:
    with channels() as (old, new):
        transfer, given, taken = await run_handoff(
            old, new, giver(old, b"41", []),
            lambda: handoff.receive(upgrade=lambda v, s, _: int(s) + 1, via=new.app_end),
        )
    assert transfer.taken and given is True and taken.value == 42 and taken.sockets == []
