"""Probes on the app's sockets: is an instance ready, does it accept, is it making progress.

Each instance gets a notify socket for its sd_notify messages and, for ``http``/``tcp``
readiness, a private health listener on 127.0.0.1 that only the supervisor's probes connect to
(:func:`open_notify_socket`, :func:`open_health_socket`). :func:`http_probe` and
:func:`tcp_probe` probe that private socket (``http`` also through a public socket's probe route,
see :meth:`sshfwup.supervisor.listeners.Listener.probe_route`); :func:`accept_probe` proves that
an app accepts on a public socket, and tells a saturated app from one that stopped accepting.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Any

import anyio

from . import sockdiag

__all__ = [
    "AcceptStalled",
    "ProbeReset",
    "accept_probe",
    "accept_queue_length",
    "http_probe",
    "open_health_socket",
    "open_notify_socket",
    "tcp_probe",
]

# Logged as the listeners' (where these probes were defined first): log configs name that logger.
log = logging.getLogger("sshfwup.supervisor.listeners")

_ACCEPT_POLL = 0.01  # how often a probe looks at an accept queue
_TCPI_UNACKED_OFFSET = 24  # struct tcp_info: 8 one-byte fields, rto, ato, snd_mss, rcv_mss, unacked


# --- one instance's private sockets --------------------------------------------------------


def open_notify_socket() -> tuple[socket.socket, str]:
    """A datagram socket for one instance's sd_notify messages, in the abstract namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    name = f"sshfwup-notify-{os.getpid()}-{os.urandom(8).hex()}"
    sock.bind("\0" + name)
    return sock, "@" + name


def open_health_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    return sock


def accept_queue_length(listener: socket.socket) -> int:
    """Connections waiting to be accepted (Linux reports it in tcpi_unacked for a listener)."""
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("=I", info, _TCPI_UNACKED_OFFSET)[0])


# --- readiness probes ----------------------------------------------------------------------


async def http_probe(port: int, path: str, *, route: tuple[socket.socket, tuple[Any, ...]] | None = None) -> str | None:
    """``GET path`` on 127.0.0.1:``port`` — or through ``route`` (see :meth:`Listener.probe_route`):
    None for a 2xx answer, else what was wrong."""
    path = path if path.startswith("/") else f"/{path}"
    if route is None:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        destination: tuple[Any, ...] = ("127.0.0.1", port)
    else:
        client, destination = route
    host = destination[0]
    authority = f"[{host}]:{destination[1]}" if ":" in host else f"{host}:{destination[1]}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: sshfwup-probe\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    try:
        await _connect(client, destination)
        while request:
            await anyio.wait_writable(client)
            request = request[client.send(request) :]
        head = b""
        while b"\r\n" not in head and len(head) < 8192:
            await anyio.wait_readable(client)
            try:
                chunk = client.recv(8192)
            except BlockingIOError:
                continue
            if not chunk:
                raise anyio.EndOfStream
            head += chunk
    finally:
        if route is None:
            client.close()
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return f"not an HTTP response: {status_line[:60]!r}"
    code = int(parts[1])
    return None if 200 <= code < 300 else f"HTTP {code}"


async def _connect(client: socket.socket, destination: tuple[Any, ...]) -> None:
    result = client.connect_ex(destination)
    if result in (errno.EINPROGRESS, errno.EAGAIN):
        await anyio.wait_writable(client)
        result = client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if result:
        raise OSError(result, os.strerror(result))


class AcceptStalled(Exception):
    """A probe connection waited while its listener accepted nothing at all for the stall time."""

    def __init__(self, seconds: float, queued: int) -> None:
        super().__init__(f"a probe connection waited {seconds:g} s while nothing was accepted there ({queued} queued)")
        self.seconds = seconds
        self.queued = queued


class ProbeReset(OSError):
    """The probe connection disappeared before any app accepted it (its listener closed)."""


_sockdiag_state: list[bool] = []  # [available], once known: the kernel does not change under us


def _lookup(listener: socket.socket) -> sockdiag.SockDiag | None:
    """A socket-diagnostics handle, or None where the kernel offers none (told once)."""
    if _sockdiag_state and not _sockdiag_state[0]:
        return None
    diag: sockdiag.SockDiag | None = None
    try:
        diag = sockdiag.SockDiag()
        if not _sockdiag_state:
            diag.check(listener)
            _sockdiag_state[:] = [True]
        return diag
    except sockdiag.SockDiagUnavailable as e:
        if diag is not None:
            diag.close()
        _sockdiag_state[:] = [False]
        log.warning("%s: health checks count accepts from the accept queue's length instead"
                    " (less exact under load)", e)  # fmt: skip
        return None


async def accept_probe(
    listener: socket.socket, route: tuple[socket.socket, tuple[Any, ...]], *, stall_timeout: float | None = None
) -> None:
    """Connect through ``route`` (see :meth:`Listener.probe_connection`) to ``listener`` and return
    once an app has accepted that connection; the caller bounds the wait.

    Saturated is not dead: with ``stall_timeout``, raise :class:`AcceptStalled` only once the
    probe is still waiting and nothing at all was seen accepted from ``listener`` for that long.
    Progress is the queue's length dropping between two polls; the probe itself is the sure sign
    (the queue is first in, first out: a listener that keeps accepting reaches it).

    Whether the probe was accepted is asked of the kernel (:mod:`sshfwup.supervisor.sockdiag`: a queued
    connection has no inode yet). Without socket diagnostics it is inferred from the queue:
    on loopback the kernel queues the connection before ``connect()`` returns, so ours is at most
    ``ahead`` places from the head then, where ``ahead`` is the queue's length read right after.
    It has been accepted once the queue was empty, or once ``ahead`` connections have left —
    counted as the drops in length between polls: a lower bound, since arrivals hide departures
    (under a closed-loop load they hide all of them: there it may never prove it).
    Raises :class:`ProbeReset` if the probe connection is reset before it was accepted.
    """
    client, destination = route
    await _connect(client, destination)
    ahead = last = accept_queue_length(listener)
    left = 0
    progress_at = anyio.current_time()
    diag = _lookup(listener)
    try:
        # the server's end: bound to where the client connected (a wildcard listener's too)
        ends = (client.getpeername(), client.getsockname())
        while True:
            if diag is not None:
                try:
                    accepted = _accepted(diag, client, *ends)
                except ProbeReset:
                    raise
                except OSError as e:  # a lookup that fails is no verdict on the app: count instead
                    log.warning("socket diagnostics failed (%s); counting accepts from the queue's length", e)
                    accepted = None
                if accepted:
                    return
                if accepted is None:
                    diag.close()
                    diag = None
            if diag is None and (not last or left >= ahead):
                return
            now = anyio.current_time()
            if stall_timeout is not None and now - progress_at >= stall_timeout:
                raise AcceptStalled(round(now - progress_at, 1), last)
            await anyio.sleep(_ACCEPT_POLL)
            length = accept_queue_length(listener)
            if length < last:
                left += last - length
                progress_at = anyio.current_time()
            last = length
    finally:
        if diag is not None:
            diag.close()


def _accepted(
    diag: sockdiag.SockDiag, client: socket.socket, local: tuple[Any, ...], remote: tuple[Any, ...]
) -> bool | None:
    """The server's end of the probe connection is no longer queued: an app holds it (or took
    it and closed it already). None: the kernel does not find it while the client's end is still
    open (no verdict: the caller counts instead). Raises ProbeReset when it vanished unaccepted."""
    end = diag.server_end(local, remote)
    if end.queued:
        return False
    if end.found:
        return True
    try:  # gone: closed by an app that accepted it (end of stream, or what it wrote first), or reset
        client.recv(1, socket.MSG_PEEK)
        return True
    except (ConnectionResetError, ConnectionAbortedError) as e:
        raise ProbeReset(e.errno, "the probe connection was reset before it was accepted") from e
    except BlockingIOError:
        log.warning("socket diagnostics do not find the probe connection %s → %s; counting accepts from the"
                    " queue's length", remote, local)  # fmt: skip
        return None


async def tcp_probe(listener: socket.socket, port: int) -> str | None:
    """Connect to the private ``listener`` at ``port``: None once the app has accepted it."""
    async with await anyio.connect_tcp("127.0.0.1", port):
        # Only probes connect to this private socket; ours leaves the queue when the app accepts it.
        while accept_queue_length(listener) > 0:
            await anyio.sleep(0.01)
    return None
