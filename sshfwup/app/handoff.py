"""State and connection hand-off between two versions of an app: wire format and the app's side.

Stdlib only, like :mod:`sshfwup.app` (reachable as ``sshfwup.app.handoff``; vendor both files).
The protocol is spelled out in docs/hot-reload-apps.md ("State and connection hand-off") so that
an app in C or Go can speak it; in short:

- With ``[app] handoff = true`` every instance gets one end of a private ``AF_UNIX``
  ``SOCK_SEQPACKET`` socket pair as the fd named in ``SSHFWUP_HANDOFF_FD``; the supervisor holds
  the other end. Each datagram is one message: a 4-byte ASCII tag, then its body.
- A starting instance sends ``WANT`` and reads what comes back: ``NONE`` (start clean; body: why)
  or ``HEAD`` (``!IQI``: state version, state size in bytes, socket count), then ``DATA``
  messages holding the state, then ``SOCK`` messages carrying the sockets (SCM_RIGHTS, at most
  :data:`MAX_FDS_PER_MESSAGE` each). It answers ``TAKE`` (it owns them now) or ``DENY`` (body:
  why; it closes what it got and starts clean). A ``NONE`` may also come in the middle: the sender
  failed, discard what arrived.
- A running instance may get ``GIVE`` at any time: it stops touching its state and the
  connections it hands over, sends ``HEAD``/``DATA``/``SOCK`` and waits for ``DONE`` (the new
  version took them and is ready: close your copies and carry on draining) or ``KEEP`` (it did
  not: everything is still yours, carry on as before).

The supervisor relays between the two ends and enforces the bounds: state size, socket count,
time (:mod:`sshfwup.supervisor.handoff_relay`). Both sides trust nothing of the other beyond that.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENV_FD",
    "ENV_TIMEOUT",
    "HandoffProtocolError",
    "Received",
    "asked",
    "available",
    "channel",
    "describe",
    "fileno",
    "receive",
    "send",
]

log = logging.getLogger(__name__)

ENV_FD = "SSHFWUP_HANDOFF_FD"
ENV_TIMEOUT = "SSHFWUP_HANDOFF_TIMEOUT"  # seconds: how long either side waits for the other
ENV_VERDICT_TIMEOUT = "SSHFWUP_HANDOFF_VERDICT_TIMEOUT"  # seconds a sender waits for DONE/KEEP
MAX_MESSAGE = 65536  # bytes in one datagram, tag included
MAX_DATA = MAX_MESSAGE - 4
MAX_FDS_PER_MESSAGE = 64
MAX_REASON = 1024  # bytes of NONE/DENY text
HEAD_FORMAT = "!IQI"  # state version, state size, socket count
HEAD_SIZE = struct.calcsize(HEAD_FORMAT)

WANT, GIVE, HEAD, DATA, SOCK = b"WANT", b"GIVE", b"HEAD", b"DATA", b"SOCK"
NONE, TAKE, DENY, DONE, KEEP = b"NONE", b"TAKE", b"DENY", b"DONE", b"KEEP"
TAGS = frozenset({WANT, GIVE, HEAD, DATA, SOCK, NONE, TAKE, DENY, DONE, KEEP})
_DEFAULT_TIMEOUT = 10.0


class HandoffProtocolError(Exception):
    """The other side broke the protocol (an unknown tag, a size beyond its bound, ...)."""


@dataclass
class Received:
    """What an instance took over: the state as the old version wrote it, and the sockets."""

    version: int
    state: bytes
    sockets: list[socket.socket] = field(default_factory=list)
    value: Any = None  # what ``receive(upgrade=...)`` made of the state


# --- wire format (shared with the supervisor's relay) ----------------------------------------


def pack_head(version: int, size: int, count: int) -> bytes:
    return HEAD + struct.pack(HEAD_FORMAT, version, size, count)


def unpack_head(message: bytes) -> tuple[int, int, int]:
    if message[:4] != HEAD or len(message) != 4 + HEAD_SIZE:
        raise HandoffProtocolError(f"expected a HEAD of {4 + HEAD_SIZE} bytes, got {show(message)}")
    version, size, count = struct.unpack(HEAD_FORMAT, message[4:])
    return version, size, count


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(tag, body); raises HandoffProtocolError for a tag outside the protocol."""
    tag, body = data[:4], data[4:]
    if tag not in TAGS:
        raise HandoffProtocolError(f"unknown message {show(data)}")
    return tag, body


def reason_text(body: bytes) -> str:
    return body[:MAX_REASON].decode("utf-8", "replace").replace("\n", " ")


def describe(state_bytes: int, sockets: int) -> str:
    """ "3 connections, 1.2 KiB of state" (what the verdict line and ``status`` say)."""
    conns = f"{sockets} connection{'s' if sockets != 1 else ''}"
    if state_bytes < 1024:
        size = f"{state_bytes} B"
    elif state_bytes < 1024 * 1024:
        size = f"{state_bytes / 1024:.1f} KiB"
    else:
        size = f"{state_bytes / (1024 * 1024):.1f} MiB"
    return f"{conns}, {size} of state"


def show(data: bytes) -> str:
    return repr(data[:12]) + ("..." if len(data) > 12 else "")


def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the fds it carried (close-on-exec). b"" at EOF. Raises
    HandoffProtocolError for a datagram or fd list that was cut (too big for the bounds)."""
    data, ancillary, flags, _ = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        close_fds(fds)
        raise HandoffProtocolError(
            f"a message over {MAX_MESSAGE} bytes or {MAX_FDS_PER_MESSAGE} sockets (cut by the kernel)"
        )
    return data, fds


def send_message(sock: socket.socket, tag: bytes, body: bytes = b"", fds: Sequence[int] = ()) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([tag + body], ancillary)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- the app's side ----------------------------------------------------------------------

_channel: socket.socket | None = None
_channel_read = False


def channel() -> socket.socket | None:
    """This instance's end of the hand-off channel (None when ``[app] handoff`` is off). The
    variable is removed and the fd made close-on-exec, so that child processes do not take it."""
    global _channel, _channel_read
    if not _channel_read:
        _channel_read = True
        text = os.environ.pop(ENV_FD, "")
        if text.isdigit():
            try:
                os.set_inheritable(int(text), False)
                _channel = socket.socket(fileno=int(text))
                _channel.setblocking(True)
            except OSError as e:
                log.warning("hand-off channel fd %s is unusable: %s", text, e)
                _channel = None
    return _channel


def available() -> bool:
    return channel() is not None


def fileno() -> int:
    """The channel's fd, to watch for readability (``GIVE``) in an event loop; -1 without one."""
    ch = channel()
    return ch.fileno() if ch is not None else -1


def _timeout(variable: str = ENV_TIMEOUT, default: float = _DEFAULT_TIMEOUT) -> float:
    try:
        value = float(os.environ.get(variable, ""))
    except ValueError:
        return default
    return value if 0 < value < 3600 else default


def _recv_within(ch: socket.socket, deadline: float) -> tuple[bytes, list[int]]:
    ch.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        return recv_message(ch)
    finally:
        ch.settimeout(None)


def receive(
    accept: Container[int] | Callable[[int], bool] = frozenset({1}),
    *,
    upgrade: Callable[[int, bytes, list[socket.socket]], Any] | None = None,
    via: socket.socket | None = None,
) -> Received | None:
    """Ask for the old version's state and connections; call once, before ``notify_ready()``.

    ``accept`` says which state versions this code understands (its ``code_change``): a set of
    versions or a predicate. ``upgrade(version, state, sockets)``, if given, turns the state into
    the app's own before the answer goes out (it must bound what it parses); an exception there
    refuses the hand-off (``DENY`` with its message) — the old version keeps everything. Its
    result is ``Received.value``. Returns what was handed over, or None — start clean — when there is
    no channel, nothing to hand over, the old version failed, the version was refused or time ran
    out. The returned sockets are blocking; they are yours: the old version closes its copies once
    you said READY=1. Blocks at most twice ``SSHFWUP_HANDOFF_TIMEOUT``. ``via``: another channel
    than this instance's (tests).
    """
    ch = via or channel()
    if ch is None:
        return None
    deadline = time.monotonic() + 2 * _timeout()
    sockets: list[socket.socket] = []
    try:
        send_message(ch, WANT)
        while True:
            data, fds = _recv_within(ch, deadline)
            close_fds(fds)
            tag, body = split_message(data) if data else (b"", b"")
            if tag == NONE:
                log.info("no hand-off: %s", reason_text(body))
                return None
            if tag == HEAD:
                break
            if not data:
                log.warning("no hand-off: the supervisor closed the channel")
                return None
        version, size, count = unpack_head(data)
        wanted = accept(version) if callable(accept) else version in accept
        state = bytearray()
        while len(state) < size or len(sockets) < count:
            data, fds = _recv_within(ch, deadline)
            sockets.extend(socket.socket(fileno=fd) for fd in fds)
            tag, body = split_message(data) if data else (NONE, b"the supervisor closed the channel")
            if tag == NONE:
                log.warning("hand-off abandoned: %s", reason_text(body))
                _close(sockets)
                return None
            if tag == DATA and len(state) + len(body) <= size:
                state += body
            elif tag != SOCK or not fds or len(sockets) > count:
                raise HandoffProtocolError(f"unexpected {show(data)} in a hand-off of {size} B and {count} sockets")
        if not wanted:
            _close(sockets)
            send_message(ch, DENY, f"state version {version} is not one this version understands".encode())
            log.warning("refused the hand-off: state version %d", version)
            return None
        for sock in sockets:
            sock.setblocking(True)
        value = None
        if upgrade is not None:
            try:
                value = upgrade(version, bytes(state), sockets)
            except Exception as e:  # the app's code_change said no: the old version keeps it all
                _close(sockets)
                send_message(ch, DENY, f"cannot use state version {version}: {e}".encode()[:MAX_REASON])
                log.warning("refused the hand-off: %s", e)
                return None
        send_message(ch, TAKE)
        return Received(version, bytes(state), sockets, value)
    except (OSError, HandoffProtocolError) as e:  # socket.timeout is an OSError
        log.warning("no hand-off: %s", e)
        _close(sockets)
        return None


def asked(*, via: socket.socket | None = None) -> bool:
    """True if the supervisor asked this instance to hand off (``GIVE``). Never blocks; call it
    when the channel is readable. Other messages waiting (a ``NONE`` nobody read) are dropped."""
    ch = via or channel()
    if ch is None:
        return False
    found = False
    ch.setblocking(False)
    try:
        while True:
            try:
                data, fds = recv_message(ch)
            except (BlockingIOError, HandoffProtocolError):
                break
            close_fds(fds)
            if not data:
                break
            found = found or data[:4] == GIVE
    finally:
        ch.setblocking(True)
    return found


def send(version: int, state: bytes, sockets: Sequence[socket.socket], *, via: socket.socket | None = None) -> bool:
    """Hand ``state`` (written in format ``version``) and ``sockets`` to the new version.

    Call it after :func:`asked` said True, with the app's work paused: nothing may change the
    state or touch the sockets until it returns. Returns True once the new version took them
    and is ready (``DONE``): close your copies, without ``shutdown()``. False (``KEEP``, or any
    failure): nothing moved, everything is still yours. Blocks at most
    ``SSHFWUP_HANDOFF_TIMEOUT`` for the transfer and then for the verdict, which comes once the
    new version is ready (bounded by the supervisor's ready timeout).
    """
    ch = via or channel()
    if ch is None:
        return False
    deadline = time.monotonic() + _timeout()
    try:
        fds = [sock.fileno() for sock in sockets]
        messages = [(pack_head(version, len(state), len(sockets)), ())]
        view = memoryview(state)
        messages += [(DATA + view[start : start + MAX_DATA], ()) for start in range(0, len(view), MAX_DATA)]
        messages += [
            (SOCK, fds[start : start + MAX_FDS_PER_MESSAGE]) for start in range(0, len(fds), MAX_FDS_PER_MESSAGE)
        ]
        for message, passed in messages:
            verdict = _send_unless_answered(ch, bytes(message), passed, deadline)
            if verdict is not None:  # the supervisor gave up on this hand-off early
                return verdict == DONE
        # The verdict waits for the new version's readiness; the supervisor bounds that.
        deadline = time.monotonic() + _timeout(ENV_VERDICT_TIMEOUT, 120.0)
        while True:
            data, received = _recv_within(ch, deadline)
            close_fds(received)
            if data[:4] in (DONE, KEEP) or not data:
                return data[:4] == DONE
    except (OSError, ValueError, HandoffProtocolError) as e:
        log.warning("hand-off failed, keeping everything: %s", e)
        return False


def _send_unless_answered(ch: socket.socket, message: bytes, fds: Sequence[int], deadline: float) -> bytes | None:
    """Send one message once the channel takes it; if a verdict (KEEP) comes first, return it."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(ch, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out sending the state")
            for _, events in selector.select(remaining):
                if events & selectors.EVENT_READ:
                    data, received = recv_message(ch)
                    close_fds(received)
                    if data[:4] in (DONE, KEEP) or not data:
                        return data[:4] or KEEP
                    continue  # a stale message (GIVE): not an answer
                if events & selectors.EVENT_WRITE:
                    try:
                        ch.setblocking(False)
                        send_message(ch, message[:4], message[4:], fds)
                        return None
                    except BlockingIOError:
                        continue
                    finally:
                        ch.setblocking(True)


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
