"""The SSH listener: each TCP connection is admitted, held in a queue, or refused with a reason.

asyncssh's own listener speaks first (its version line) on every connection it accepts, so a
connection over a limit could only be reset, and ``ssh`` showed "kex_exchange_identification:
read: Connection reset by peer" (issue 27). This gate accepts the TCP connection itself and asks
:mod:`sshfwup.ssh.admission`:

- **admitted**: the socket is handed to asyncssh (``asyncssh.run_server``); ``login_timeout``
  counts from the TCP connect, time spent queued included (sshd's LoginGraceTime).
- **over a start-up limit** (per source, or MaxStartups): held, unread and unanswered, in a
  bounded FIFO queue until there is room (:meth:`Admission.room`), at most ``login_timeout``.
  A burst of ``ssh HOST status`` from one address (a fleet tool, an office behind one NAT) is
  answered a few at a time instead of refused; the client just waits for the version line.
- **refused** (queue full, penalty, the queue wait ran out): the server sends its version line
  and an unencrypted SSH_MSG_DISCONNECT saying why and when to try again. Verified with
  OpenSSH 9.2's ``ssh``: it prints "Received disconnect from HOST port P:12: <reason>" even at
  ``LogLevel=ERROR``; text lines before the version line (RFC 4253 §4.2) are only shown with
  ``-v``, so they are not used.

Refusals are logged once per source and kind per ``LOG_INTERVAL`` with a count, not once per
connection: a flood must not flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import asyncssh

from sshfwup.system.ports import bind_tcp

from .admission import Admission, Refused, Ticket

log = logging.getLogger(__name__)

__all__ = ["Gate", "Place", "disconnect_packet"]

LOG_INTERVAL = 10.0  # seconds: one log line per source and kind of refusal at most
TICK = 0.5  # seconds between looks at the queue (room also comes on every close)
SAYING_NO_MAX = 64  # refusals being written at once; past that a flood is just closed
DISCONNECT_TOO_MANY_CONNECTIONS = 12  # RFC 4253 §11.1


def disconnect_packet(reason: str, code: int = DISCONNECT_TOO_MANY_CONNECTIONS) -> bytes:
    """An SSH_MSG_DISCONNECT as the first, unencrypted binary packet (RFC 4253 §6, §11.1)."""
    text = reason.encode("utf-8")
    payload = bytes([1]) + struct.pack(">I", code) + struct.pack(">I", len(text)) + text + struct.pack(">I", 0)
    padding = 8 - (5 + len(payload)) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + bytes(padding)


@dataclass(eq=False)
class Place:
    """An admitted connection before and after asyncssh takes it: what admission may look at or drop."""

    sock: socket.socket
    conn: asyncssh.SSHServerConnection | None = None
    on_drop: Callable[[], None] | None = None  # set by the connection (it logs why)

    def silent(self) -> bool:
        return self.conn is None or self.conn.get_extra_info("client_version") is None

    def drop(self) -> None:
        if self.on_drop is not None:
            self.on_drop()
        elif self.conn is not None:
            self.conn.abort()
        else:
            self.sock.close()


@dataclass(eq=False)
class _Waiting:
    sock: socket.socket
    address: str
    source: str
    since: float


@dataclass
class _Said:
    last: float
    more: int = 0


@dataclass
class _Announcer:
    """Logs a line per (source, kind) at most once per interval, with how many it left out."""

    interval: float = LOG_INTERVAL
    _said: dict[tuple[str, str], _Said] = field(default_factory=dict)

    def say(self, source: str, kind: str, message: str) -> None:
        now = time.monotonic()
        said = self._said.get((source, kind))
        if said is not None and now - said.last < self.interval:
            said.more += 1
            return
        more = f" (and {said.more} more like it in the last {now - said.last:.0f} s)" if said and said.more else ""
        log.warning("%s%s", message, more)
        if len(self._said) > 4096:
            self._said = {k: v for k, v in self._said.items() if now - v.last < self.interval}
        self._said[(source, kind)] = _Said(now)


#: ``start(sock, ticket, place, login_timeout)``: runs an admitted connection (a coroutine)
Starter = Callable[[socket.socket, Ticket, Place, float], Coroutine[Any, Any, None]]


class Gate:
    def __init__(
        self, admission: Admission, start: Starter, *, login_timeout: float, queue_per_source: int, queue_total: int
    ) -> None:
        self._admission = admission
        self._start = start
        self._login_timeout = login_timeout
        self._queue_per_source = queue_per_source
        self._queue_total = queue_total
        self._queue: list[_Waiting] = []
        self._announce = _Announcer()
        self._version = f"SSH-2.0-AsyncSSH_{asyncssh.__version__}\r\n".encode()
        self._tasks: set[asyncio.Task[None]] = set()
        self._saying_no = 0
        self._pump_soon = False
        self.sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []

    async def listen(self, host: str, port: int) -> None:
        """Bind ``host:port`` (every address it resolves to) and start accepting. OSError as bind's."""
        self.adopt(bind_tcp(host, port))

    def adopt(self, sockets: list[socket.socket]) -> None:
        """Accept on listening sockets bound elsewhere (by the supervisor, which keeps them open
        while this process restarts: connections wait in the backlog meanwhile)."""
        for sock in sockets:
            sock.setblocking(False)
            self.sockets.append(sock)
        for sock in self.sockets:
            self._accepting.append(self._spawn(self._accept(sock)))
        self._spawn(self._tick())

    def stop_accepting(self) -> None:
        """Accept no more, at once (no await): a connection not yet accepted stays in the
        listening socket's backlog, for whoever accepts next (a new front)."""
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            loop.remove_reader(sock.fileno())  # also cancels a callback already due this turn
        for task in self._accepting:
            task.cancel()
        self._accepting.clear()

    @property
    def waiting(self) -> int:
        """Connections accepted and held unanswered for room (see the module docstring)."""
        return len(self._queue)

    async def close(self) -> None:
        """Stop accepting; refuse nothing more; what is queued is closed (the server is going)."""
        self._admission.closing = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for waiting in self._queue:
            waiting.sock.close()
        self._queue.clear()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def freed(self) -> None:
        """A connection logged in or went: the queue may move (soon: not inside the caller)."""
        if self._queue and not self._pump_soon:
            self._pump_soon = True
            asyncio.get_running_loop().call_soon(self._pump)

    # --- accepting ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and the like: do not spin
                log.warning("accepting an SSH connection failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            self._arrived(sock, str(peer[0]), time.monotonic())

    def _arrived(self, sock: socket.socket, address: str, since: float) -> None:
        place = Place(sock)
        try:
            ticket = self._admission.arrive(address, silent=place.silent, drop=place.drop)
        except Refused as e:
            source = e.source
            if e.queueable and not self._has_room_in_queue(source):
                self._evict_silent(source)
            if e.queueable and self._has_room_in_queue(source):
                self._queue.append(_Waiting(sock, address, source, since))
                self._announce.say(source, "queued", f"queued connections from {source}: {e}")
                return
            if e.queueable:
                e = Refused(f"{e}, and the queue for it is full ({self._queue_per_source} per source, "
                            f"{self._queue_total} in all)", source=source, retry_after=e.retry_after, queueable=True)  # fmt: skip
            self._refuse(sock, e, "refused")
            return
        self._spawn(self._start(sock, ticket, place, max(1.0, self._login_timeout - (time.monotonic() - since))))

    def _evict_silent(self, source: str) -> None:
        """The source's queue is full: its oldest entry that has said nothing for
        ``silent_grace`` goes (closed, no answer), so that a client behind its own address's
        flood can still get in line."""
        grace, now = self._admission.limits.silent_grace, time.monotonic()
        for waiting in self._queue:
            if waiting.source == source and now - waiting.since >= grace and _peek(waiting.sock) == b"":
                self._queue.remove(waiting)
                waiting.sock.close()
                self._admission.ended_silent(waiting.address)
                return

    def _has_room_in_queue(self, source: str) -> bool:
        if len(self._queue) >= self._queue_total:
            return False
        return sum(1 for w in self._queue if w.source == source) < self._queue_per_source

    # --- the queue -----------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._pump()

    def _pump(self) -> None:
        self._pump_soon = False
        now = time.monotonic()
        for waiting in list(self._queue):
            if _peek(waiting.sock) is None:
                # closed by the client without a word (anything it sent would still be unread
                # here, ahead of the end): it never started the handshake — its doing
                self._queue.remove(waiting)
                waiting.sock.close()
                self._admission.ended_silent(waiting.address)
            elif now - waiting.since >= self._login_timeout:
                self._queue.remove(waiting)
                why = Refused(f"waited {now - waiting.since:.0f} s for room (login_timeout)", source=waiting.source,
                              retry_after=self._admission.limits.stall_grace, queueable=True)  # fmt: skip
                self._refuse(waiting.sock, why, "timed out in the queue")
            elif _waiting_for_our_version(waiting.sock) and self._admission.room(waiting.address):
                self._queue.remove(waiting)
                self._arrived(waiting.sock, waiting.address, waiting.since)

    # --- refusing ------------------------------------------------------------------------------

    def _refuse(self, sock: socket.socket, why: Refused, kind: str) -> None:
        self._announce.say(why.source, kind, f"{kind} connections from {why.source}: {why}; told "
                                             f"{why.told()!r}")  # fmt: skip
        if self._saying_no >= SAYING_NO_MAX:
            sock.close()
            return
        self._saying_no += 1
        self._spawn(self._say_no(sock, why.told()))

    async def _say_no(self, sock: socket.socket, told: str) -> None:
        """To an SSH client (its version line came and it waits for ours): our version line,
        then the disconnect; then wait for it to close (closing on its unread data would reset
        the connection and lose the message on the way). Anything else is just closed: a
        connection that says nothing or more than a version line gets no version line from us."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(1.0):
                while not _said_something(sock):
                    await asyncio.sleep(0.05)
            if not _waiting_for_our_version(sock):
                return
            async with asyncio.timeout(2.0):
                await loop.sock_sendall(sock, self._version + disconnect_packet(told))
                sock.shutdown(socket.SHUT_WR)
                while await loop.sock_recv(sock, 4096):
                    pass
        except (OSError, TimeoutError):
            pass
        finally:
            sock.close()
            self._saying_no -= 1


def _peek(sock: socket.socket) -> bytes | None:
    """What the client has sent so far (unread), or None when it closed."""
    try:
        return sock.recv(4096, socket.MSG_PEEK) or None
    except BlockingIOError:
        return b""
    except OSError:
        return None


def _said_something(sock: socket.socket) -> bool:
    data = _peek(sock)
    if data is None:
        raise ConnectionError("closed by the client")
    return b"\n" in data or len(data) >= 255


def _waiting_for_our_version(sock: socket.socket) -> bool:
    """A client that sent its version line and now waits for ours, as OpenSSH's ``ssh`` does.

    Only such a one leaves the queue: a silent connection, or one that sends more without
    hearing from us (a slow-handshake flood), stays until ``login_timeout`` and is not
    answered at all — it is what the queue must not let in a few at a time.
    """
    data = _peek(sock) or b""
    return data.startswith(b"SSH-") and data.endswith(b"\n") and data.count(b"\n") == 1
