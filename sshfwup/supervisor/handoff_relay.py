"""The supervisor's side of the state and connection hand-off (wire format: :mod:`sshfwup.app.handoff`).

Each instance of an app with ``[app] handoff = true`` gets a :class:`Channel`. During a swap the
supervisor waits for the new instance's ``WANT``, asks the old one to ``GIVE`` and relays what it
sends, message by message — never more than one message and its sockets held here, whatever the
state's size — checking every bound on the way: the state's size, the number of sockets (each
one must be a socket), the time. The receiver answers ``TAKE`` or ``DENY``; the supervisor later
tells the sender ``DONE`` (the receiver is ready) or ``KEEP`` (it is not: nothing moved).

Imported only when an app has hand-off on.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from dataclasses import dataclass

import anyio

from sshfwup.app import handoff
from sshfwup.app.handoff import DATA, DENY, DONE, GIVE, HEAD, KEEP, NONE, SOCK, TAKE, WANT, HandoffProtocolError

__all__ = ["Channel", "Limits", "Transfer", "relay", "wait_want"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_state: int  # bytes
    max_sockets: int
    timeout: float  # seconds for the transfer, and again for the receiver's answer


@dataclass(frozen=True)
class Transfer:
    """How one hand-off went: ``taken`` once the receiver answered TAKE."""

    taken: bool
    sender: str  # versions
    receiver: str
    state_version: int | None = None
    state_bytes: int = 0
    sockets: int = 0
    seconds: float = 0.0
    problem: str = ""  # why nothing was taken

    def summary(self) -> str:
        """What the verdict line says: "3 connections, 1.2 KiB of state" or why there was none."""
        if self.taken:
            return handoff.describe(self.state_bytes, self.sockets)
        return self.problem

    def verdict(self) -> str:
        """For the verdict line: "handed over 3 connections, 1.2 KiB of state" or "no hand-off: why"."""
        return f"handed over {self.summary()}" if self.taken else f"no hand-off: {self.problem}"


class _SenderFailed(Exception):
    pass


class _ReceiverFailed(Exception):
    pass


class Channel:
    """The supervisor's end of one instance's hand-off socket pair."""

    def __init__(self) -> None:
        kind = socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        self.mine, self.app_end = socket.socketpair(socket.AF_UNIX, kind)
        self.app_end.setblocking(True)  # O_NONBLOCK is per end: the app's end blocks
        self.broken = False  # an aborted transfer left it in an unknown state: never used again

    def passed_fd(self) -> int:
        assert self.app_end is not None
        return self.app_end.fileno()

    def spawned(self) -> None:
        """The instance holds its end now: ours goes, so that its exit reads as end-of-file."""
        if self.app_end is not None:
            self.app_end.close()
            self.app_end = None  # type: ignore[assignment]

    def close(self) -> None:
        self.spawned()
        self.mine.close()

    def tell(self, tag: bytes, text: str = "") -> None:
        """A short message now (NONE, KEEP, DONE); a failure is logged, never raised."""
        try:
            handoff.send_message(self.mine, tag, text.encode()[: handoff.MAX_REASON])
        except OSError as e:
            log.debug("hand-off channel: cannot send %r: %s", tag, e)

    async def send(self, tag: bytes, body: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> None:
        while True:
            try:
                handoff.send_message(self.mine, tag, body, fds)
                return
            except BlockingIOError:
                await anyio.wait_writable(self.mine)

    async def receive(self) -> tuple[bytes, list[int]]:
        while True:
            try:
                return handoff.recv_message(self.mine)
            except BlockingIOError:
                await anyio.wait_readable(self.mine)


async def wait_want(channel: Channel) -> bool:
    """True once the instance sent WANT; False if it closed its end (exited) first."""
    while True:
        try:
            data, fds = await channel.receive()
        except (OSError, HandoffProtocolError):
            return False
        handoff.close_fds(fds)
        if not data:
            return False
        if data[:4] == WANT:
            return True


async def relay(
    sender: Channel, receiver: Channel, limits: Limits, *, sender_name: str, receiver_name: str
) -> Transfer:
    """Ask ``sender`` to give, pass everything to ``receiver`` (which sent WANT), return its answer.

    Whatever fails, the receiver is told NONE (start clean) and the sender KEEP — except after a
    TAKE, when the caller tells the sender DONE or KEEP once it knows whether the receiver is
    ready. Cancelled midway, both channels are marked broken.
    """
    began = time.monotonic()
    head: tuple[int, int, int] | None = None
    finished = False
    try:
        try:
            with anyio.fail_after(limits.timeout):
                head = await _forward(sender, receiver, limits, sender_name)
            with anyio.fail_after(limits.timeout):
                answer = await _answer(receiver, receiver_name)
        except TimeoutError:
            stage = "sending its state" if head is None else "taking the state"
            who = sender_name if head is None else receiver_name
            raise (_SenderFailed if head is None else _ReceiverFailed)(
                f"{who} took over {limits.timeout:g} s {stage}"
            ) from None
        finished = True
    except _SenderFailed as e:
        finished = True
        sender.broken = True
        receiver.tell(NONE, f"{sender_name} failed to hand off: {e}")
        sender.tell(KEEP)
        problem = f"the hand-off failed: {e}; {receiver_name} starts clean"
        return Transfer(False, sender_name, receiver_name, problem=problem)
    except _ReceiverFailed as e:
        finished = True
        receiver.broken = True
        sender.tell(KEEP)
        return Transfer(False, sender_name, receiver_name, problem=f"the hand-off failed: {e}")
    finally:
        if not finished:  # cancelled: nobody knows where either side stands
            sender.broken = receiver.broken = True
    version, size, count = head
    seconds = time.monotonic() - began
    if answer is not None:
        sender.tell(KEEP)
        return Transfer(False, sender_name, receiver_name, version, size, count, seconds,
                        problem=f"{receiver_name} refused state version {version} ({answer})")  # fmt: skip
    return Transfer(True, sender_name, receiver_name, version, size, count, seconds)


async def _forward(sender: Channel, receiver: Channel, limits: Limits, sender_name: str) -> tuple[int, int, int]:
    await sender.send(GIVE)
    data = await _from_sender(sender, sender_name, skip_stale=True)
    try:
        version, size, count = handoff.unpack_head(data)
    except HandoffProtocolError as e:
        raise _SenderFailed(str(e)) from None
    if size > limits.max_state:
        raise _SenderFailed(
            f"its state of {size} bytes is over the limit of {limits.max_state} ([app] handoff_max_state)"
        )
    if count > limits.max_sockets:
        raise _SenderFailed(f"{count} sockets are over the limit of {limits.max_sockets} ([app] handoff_max_sockets)")
    await _to_receiver(receiver, data)
    sent_bytes = sent_fds = 0
    while sent_bytes < size or sent_fds < count:
        fds: list[int] = []
        try:
            data, fds = await _from_sender_with_fds(sender, sender_name)
            tag, body = data[:4], data[4:]
            if tag == DATA and not fds and sent_bytes + len(body) <= size:
                sent_bytes += len(body)
            elif (tag == SOCK and fds and sent_bytes == size and sent_fds + len(fds) <= count
                  and all(_is_socket(fd) for fd in fds)):  # fmt: skip
                sent_fds += len(fds)
            else:
                raise _SenderFailed(
                    f"sent {handoff.show(data)} with {len(fds)} fd(s) where {size - sent_bytes} more bytes of state"
                    f" and {count - sent_fds} more sockets were due"
                )
            await _to_receiver(receiver, data, fds)
        finally:
            handoff.close_fds(fds)  # the receiver has its own copies now (or nobody needs them)
    return version, size, count


async def _from_sender(sender: Channel, name: str, *, skip_stale: bool = False) -> bytes:
    while True:
        data, fds = await _from_sender_with_fds(sender, name)
        handoff.close_fds(fds)
        if skip_stale and data[:4] == WANT:
            continue  # its own WANT from when it started, never read
        return data


async def _from_sender_with_fds(sender: Channel, name: str) -> tuple[bytes, list[int]]:
    try:
        data, fds = await sender.receive()
    except (OSError, HandoffProtocolError) as e:
        raise _SenderFailed(str(e)) from None
    if not data:
        raise _SenderFailed(f"{name} closed its channel (exited?)")
    if data[:4] == HEAD or data[:4] in (DATA, SOCK, WANT):
        return data, fds
    handoff.close_fds(fds)
    raise _SenderFailed(f"unexpected message {handoff.show(data)}")


async def _to_receiver(receiver: Channel, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    try:
        await receiver.send(data[:4], data[4:], fds)
    except OSError as e:
        raise _ReceiverFailed(f"cannot pass it on: {e.strerror or e}") from None


async def _answer(receiver: Channel, name: str) -> str | None:
    """None for TAKE, the reason for DENY; raises _ReceiverFailed otherwise."""
    try:
        data, fds = await receiver.receive()
    except (OSError, HandoffProtocolError) as e:
        raise _ReceiverFailed(str(e)) from None
    handoff.close_fds(fds)
    if data[:4] == TAKE:
        return None
    if data[:4] == DENY:
        return handoff.reason_text(data[4:]) or "no reason given"
    if not data:
        raise _ReceiverFailed(f"{name} closed its channel (exited?) before taking the state")
    raise _ReceiverFailed(f"{name} answered {handoff.show(data)} instead of TAKE or DENY")


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False

