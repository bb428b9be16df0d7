"""What the app's public sockets answer while no version of the app runs.

The supervisor keeps the listening sockets open for its whole life, so a connection that arrives
while the app is down would wait in the kernel's queue until the client gives up: a hang, with
no hint why. While no instance runs (it crashed and waits for its restart, or it does not start
at all) the supervisor accepts on the public sockets itself (:class:`~sshfwup.supervisor.supervisor.Supervisor`
decides when) and answers each connection here:

- on a socket named in ``[app] http_sockets``: ``HTTP/1.1 503 Service Unavailable`` with a short
  plain-text reason, ``Retry-After`` and ``Connection: close``, after reading the request's head
  (closing with an unread request would reset the connection before the client reads the answer);
- on any other socket: closed at once, with a reset where the kernel allows it (TCP), so the
  client sees an error instead of waiting.

The reason is the supervisor's one line ("2.0.0 exited with status 3"), never the app's output:
this port is public, the output (``ssh device status``) is not.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
import struct

import anyio

__all__ = ["answer_503", "close_at_once", "response_503"]

log = logging.getLogger(__name__)

_HEAD_LIMIT = 16 * 1024  # a request head longer than this is not read to its end
_HEAD_TIMEOUT = 2.0  # seconds a client gets to send its request head
_DRAIN_LIMIT = 64 * 1024  # a request body read (and dropped) after the answer, at most
_DRAIN_TIMEOUT = 1.0
_RETRY_AFTER_DEFAULT = 5
_RETRY_AFTER_MAX = 300


def response_503(reason: str, retry_after: float | None) -> bytes:
    """The whole answer: status line, headers, a one-line plain-text body."""
    seconds = _RETRY_AFTER_DEFAULT if retry_after is None else min(_RETRY_AFTER_MAX, max(1, math.ceil(retry_after)))
    body = f"503 Service Unavailable: the application is not running ({_one_line(reason)})\n".encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {seconds}\r\n"
        "Cache-Control: no-store\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _one_line(text: str) -> str:
    # The reason is ours, but it names the app's version (from the boot env): keep the header
    # section and the line intact whatever it holds.
    return "".join(c if c.isprintable() else " " for c in text)[:300]


def close_at_once(conn: socket.socket) -> None:
    """Close an accepted connection with a reset (TCP; a UNIX socket just closes)."""
    try:
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


async def answer_503(conn: socket.socket, reason: str, retry_after: float | None) -> None:
    """Read the request's head (bounded in size and time), answer 503, close. Never raises for
    what the client does (it may be gone already)."""
    conn.setblocking(False)
    try:
        head = b""
        with anyio.move_on_after(_HEAD_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                chunk = await _recv(conn, _HEAD_LIMIT - len(head))
                if not chunk:
                    break
                head += chunk
        data = response_503(reason, retry_after)
        with anyio.move_on_after(_HEAD_TIMEOUT):
            while data:
                await anyio.wait_writable(conn)
                try:
                    data = data[conn.send(data) :]
                except BlockingIOError:
                    continue
        conn.shutdown(socket.SHUT_WR)
        # A request body still on its way: read and drop it, so that closing does not reset the
        # connection before the client has read the answer.
        left = _DRAIN_LIMIT
        with anyio.move_on_after(_DRAIN_TIMEOUT):
            while left > 0:
                chunk = await _recv(conn, min(left, 16 * 1024))
                if not chunk:
                    break
                left -= len(chunk)
    except OSError as e:
        if e.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            log.debug("answering 503: %s", e)
    finally:
        conn.close()


async def _recv(conn: socket.socket, size: int) -> bytes:
    while True:
        await anyio.wait_readable(conn)
        try:
            return conn.recv(size)
        except BlockingIOError:
            continue
