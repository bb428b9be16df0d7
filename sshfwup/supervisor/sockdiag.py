"""Has a queued TCP connection been accepted yet? Asked of the kernel (NETLINK_SOCK_DIAG).

A connection waiting in a listener's accept queue is a full kernel socket already — its handshake
completed — but no process holds it: it has no file, and the kernel reports inode 0 for it. Once
an app ``accept()``s it, it gets one. So one exact lookup of the server's end of a connection (by
its four-tuple, ``SOCK_DIAG_BY_FAMILY`` without ``NLM_F_DUMP``: the kernel looks one socket up, it
does not list them) tells whether it was accepted, whatever else is queued or arrives meanwhile.
That is what :func:`sshfwup.supervisor.listeners.accept_probe` needs under load: counting departures from the
queue's length cannot see them when new connections arrive as fast as old ones are accepted.

Plain ``socket`` and ``struct``, no dependency; ``inet_diag``/``tcp_diag`` are in every common
kernel configuration (``CONFIG_INET_DIAG`` defaults to y) and ``ss`` uses the same interface.
Where it is missing, :class:`SockDiag` says so once (:class:`SockDiagUnavailable`) and the caller
falls back to the queue's length.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

__all__ = ["ConnectionState", "SockDiag", "SockDiagUnavailable"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x01
_NLMSG_ERROR = 0x02
_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
# struct inet_diag_req_v2: family, protocol, ext, pad, states; then struct inet_diag_sockid:
# sport, dport (big-endian), src[4], dst[4] (network order), interface, cookie[2]
_REQUEST = struct.Struct("=BBBBIHH16s16sIII")  # ports go in as htons(): big-endian bytes
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF
# struct inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), expires, rqueue, wqueue,
# uid, inode
_REPLY = struct.Struct("=BBBB48xIIIII")
TCP_ESTABLISHED = 1
TCP_LISTEN = 10


class SockDiagUnavailable(OSError):
    """The kernel answers no socket lookups (no inet_diag/tcp_diag, or netlink refused)."""


@dataclass(frozen=True)
class ConnectionState:
    """The server's end of one connection as the kernel reports it."""

    found: bool  # False: no such connection (it was closed, or reset)
    state: int = 0  # TCP_ESTABLISHED, ...
    inode: int = 0  # 0 while it waits in an accept queue (no process holds it)

    @property
    def queued(self) -> bool:
        """Still waiting in an accept queue: established, and no process has it."""
        return self.found and self.state == TCP_ESTABLISHED and self.inode == 0


class SockDiag:
    """One netlink socket for exact TCP lookups; :meth:`close` it (or use ``with``)."""

    def __init__(self) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
        except OSError as e:
            raise SockDiagUnavailable(e.errno, f"no socket diagnostics (NETLINK_SOCK_DIAG): {e.strerror}") from e
        # The kernel answers a lookup before sendto() returns; the bound only guards the event loop
        self._sock.settimeout(1.0)
        self._sequence = 0

    def __enter__(self) -> SockDiag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def server_end(self, local: tuple[Any, ...], remote: tuple[Any, ...]) -> ConnectionState:
        """The connection whose server's end is bound to ``local`` and talks to ``remote``
        (``getsockname()``-style addresses). Blocks for one kernel round trip (microseconds)."""
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        self._sequence += 1
        request = _REQUEST.pack(
            family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES,
            socket.htons(local[1]), socket.htons(remote[1]), _address(local[0]), _address(remote[0]),
            0, _NO_COOKIE, _NO_COOKIE,
        )  # fmt: skip
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                                    self._sequence, 0)  # fmt: skip
        self._sock.sendto(header + request, (0, 0))
        while True:
            data = self._sock.recv(8192)
            length, kind, _, sequence, _ = _NLMSG_HEADER.unpack_from(data)
            if sequence == self._sequence:
                break  # else the answer to an earlier request that timed out in between: skip it
        body = data[_NLMSG_HEADER.size : length]
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0]
            if code == errno.ENOENT:
                return ConnectionState(found=False)
            raise OSError(code, os.strerror(code))
        _family, state, _timer, _retrans, _expires, _rqueue, _wqueue, _uid, inode = _REPLY.unpack_from(body)
        if state == TCP_LISTEN:
            return ConnectionState(found=False)  # the lookup falls back to the listener: no connection
        return ConnectionState(found=True, state=state, inode=inode)

    def check(self, listener: socket.socket) -> None:
        """Raise :class:`SockDiagUnavailable` unless the kernel finds ``listener`` itself: "not
        found" must mean no such connection, not a kernel without TCP diagnostics."""
        local = listener.getsockname()
        family = socket.AF_INET6 if listener.family == socket.AF_INET6 else socket.AF_INET
        request = _REQUEST.pack(
            family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN,
            socket.htons(local[1]), 0, _address(local[0]), bytes(16), 0, _NO_COOKIE, _NO_COOKIE,
        )  # fmt: skip
        self._sequence += 1
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST,
                                    self._sequence, 0)  # fmt: skip
        try:
            self._sock.sendto(header + request, (0, 0))
            data = self._sock.recv(8192)
        except OSError as e:
            raise SockDiagUnavailable(e.errno, f"socket diagnostics refused: {e.strerror}") from e
        _, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data)
        if kind == _NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, _NLMSG_HEADER.size)[0]
            raise SockDiagUnavailable(code, f"the kernel does not find a listening socket: {os.strerror(code)}"
                                      " (no tcp_diag?)")  # fmt: skip


def _address(host: str) -> bytes:
    """16 bytes of inet_diag_sockid's address field (IPv4 in the first four)."""
    packed = ipaddress.ip_address(host.split("%", 1)[0]).packed
    return packed.ljust(16, b"\0")
