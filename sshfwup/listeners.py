"""The supervisor's sockets: the app's shared listeners, and each instance's private ones.

The shared listeners are bound once and passed to every instance of the app (see
:mod:`sshfwup.supervisor`). Each instance also gets a notify socket for its sd_notify messages
and, for ``http``/``tcp`` readiness, a private health listener on 127.0.0.1 that only the
supervisor's probes connect to.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import anyio

from sshfwup.config import SocketSpec

__all__ = [
    "Listener",
    "ListenerError",
    "accept_queue_length",
    "bind_listeners",
    "close_listeners",
    "http_probe",
    "open_health_socket",
    "open_notify_socket",
    "tcp_probe",
]

_TCPI_UNACKED_OFFSET = 24  # struct tcp_info: 8 one-byte fields, rto, ato, snd_mss, rcv_mss, unacked


class ListenerError(Exception):
    """A listening socket cannot be set up (address in use, bad name, a file in the way)."""


@dataclass(frozen=True)
class Listener:
    """A listening socket the supervisor owns and passes to every instance."""

    name: str
    spec: SocketSpec
    sock: socket.socket

    @property
    def address(self) -> str:
        if self.spec.kind == "unix":
            return f"unix:{self.spec.address}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def bind_listeners(specs: tuple[SocketSpec, ...]) -> tuple[Listener, ...]:
    """Bind and listen on every socket; all or nothing."""
    listeners: list[Listener] = []
    try:
        for index, spec in enumerate(specs):
            name = spec.name or f"{spec.kind}-{index}"
            if ":" in name:
                raise ListenerError(f"socket name {name!r} must not contain ':' (it separates LISTEN_FDNAMES)")
            listeners.append(Listener(name, spec, _bind(spec)))
    except BaseException:
        close_listeners(listeners)
        raise
    return tuple(listeners)


def _bind(spec: SocketSpec) -> socket.socket:
    try:
        if spec.kind == "tcp":
            family, _, _, _, address = socket.getaddrinfo(
                spec.address, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            _remove_stale_unix_socket(Path(spec.address))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = spec.address
        try:
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            # Non-blocking from the start and for good: the flag belongs to the shared file
            # description, so flipping it later would change it under a running instance.
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except OSError as e:
        raise ListenerError(f"cannot listen on {spec}: {e.strerror or e}") from e
    return sock


def _remove_stale_unix_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenerError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # nobody listens: a leftover of an earlier run
            return
    raise ListenerError(f"cannot listen on unix:{path}: another process is listening there")


def close_listeners(listeners: list[Listener] | tuple[Listener, ...]) -> None:
    for listener in listeners:
        listener.sock.close()  # close, never shutdown(): an app may still hold its copy
        if listener.spec.kind == "unix":
            Path(listener.spec.address).unlink(missing_ok=True)


# --- one instance's private sockets --------------------------------------------------------


def open_notify_socket() -> tuple[socket.socket, str]:
    """A datagram socket for one instance's sd_notify messages, in the abstract namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    name = f"sshfwup-notify-{os.getpid()}-{secrets.token_hex(8)}"
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


async def http_probe(port: int, path: str) -> str | None:
    """``GET path`` on 127.0.0.1:``port``: None for a 2xx answer, else what was wrong."""
    path = path if path.startswith("/") else f"/{path}"
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: sshfwup-probe\r\n"
        "Connection: close\r\n\r\n"
    )
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(request.encode())
        head = b""
        while b"\r\n" not in head and len(head) < 8192:
            head += await stream.receive()
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return f"not an HTTP response: {status_line[:60]!r}"
    code = int(parts[1])
    return None if 200 <= code < 300 else f"HTTP {code}"


async def tcp_probe(listener: socket.socket, port: int) -> str | None:
    """Connect to the private ``listener`` at ``port``: None once the app has accepted it."""
    async with await anyio.connect_tcp("127.0.0.1", port):
        # Only probes connect to this private socket; ours leaves the queue when the app accepts it.
        while accept_queue_length(listener) > 0:
            await anyio.sleep(0.01)
    return None
