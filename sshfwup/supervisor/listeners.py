"""The supervisor's sockets: the app's listeners, and each instance's private ones.

A :class:`Listener` is one configured socket (``[app] sockets``) and the way it goes from one
version of the app to the next — its *socket path*:

- ``reuseport`` and ``reuseport+migrate`` (TCP, wherever the kernel takes a reuseport program):
  every instance gets a listening socket of its own, all bound to the same address with
  ``SO_REUSEPORT`` and forming one reuseport group. A classic BPF program attached to the group
  (``SO_ATTACH_REUSEPORT_CBPF``) returns, for each new connection, the index of the socket it
  goes to, so the supervisor decides which instance receives new connections: a swap steers them
  to the new version's socket once it is ready, while the old version goes on accepting what is
  already queued on its own. A socket leaves the group when the supervisor ``shutdown()``s it,
  after its instance has exited. With ``net.ipv4.tcp_migrate_req = 1`` (Linux >= 5.14) the
  connections still queued there then move to another socket of the group
  (``reuseport+migrate``); without it they would be reset (``reuseport``) — only a handshake that
  completed after the hand-over can still be queued there by then.
- ``shared`` (UNIX sockets, kernels that refuse the program, or when steering is off): one
  socket for the device's lifetime, passed to every instance; during a swap both versions accept
  from the same queue.

The supervisor keeps its own copy of every socket, so a socket never closes while an instance
restarts: connections wait in its queue instead of being refused.

The kernel numbers a group's sockets in the order they started listening (``listen()``); when one
leaves, the last one takes its number, and a program answer beyond the last number falls back to
the kernel's hash. :class:`Listener` mirrors that order to compute the program's answers; the
supervisor keeps at most two sockets in a group (old and new version), so even the moment between
a socket leaving and the program being updated cannot send a connection to a wrong socket.

Readiness probes for the steered path connect from a source port of their own, which the program
sends to the probed instance's socket (:meth:`Listener.probe_route`): a probe through the public
address then reaches the new version, never the old one, and an app that serves only its one

The reuseport program itself is in :mod:`sshfwup.supervisor.reuseport`; the probes that go through
these sockets, and each instance's private notify and health sockets, in
:mod:`sshfwup.supervisor.probes` (their names are importable from here too).
"""

from __future__ import annotations

import logging
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from sshfwup.config import SocketSpec

# Defined apart, importable from here as before
from .probes import (
    AcceptStalled,
    ProbeReset,
    accept_probe,
    accept_queue_length,
    http_probe,
    open_health_socket,
    open_notify_socket,
    tcp_probe,
)
from .reuseport import Instruction, attach_reuseport_program, migration_enabled, reuseport_program

__all__ = [
    "AcceptStalled",
    "Instruction",
    "Listener",
    "ListenerError",
    "ProbeReset",
    "SocketPath",
    "accept_probe",
    "accept_queue_length",
    "attach_reuseport_program",
    "bind_listeners",
    "close_listeners",
    "http_probe",
    "migration_enabled",
    "open_health_socket",
    "open_notify_socket",
    "reuseport_program",
    "tcp_probe",
]

log = logging.getLogger(__name__)

SocketPath = Literal["shared", "reuseport", "reuseport+migrate"]


class ListenerError(Exception):
    """A listening socket cannot be set up (address in use, bad name, a file in the way)."""



# --- listeners ------------------------------------------------------------------------------


class Listener:
    """One configured listening socket, and the kernel sockets behind it (see the module doc).

    ``sock`` is the socket that receives new connections now. On the shared path it is the only
    one and every method that hands sockets around returns or accepts it unchanged.
    """

    def __init__(self, name: str, spec: SocketSpec, sock: socket.socket, *, steered: bool) -> None:
        self.name = name
        self.spec = spec
        self._members = [sock]  # the kernel's order of the reuseport group
        self._target = sock
        self._probes: dict[int, socket.socket] = {}  # source port → socket, for readiness probes
        self._steered = steered
        if steered:
            self._attach()

    @property
    def sock(self) -> socket.socket:
        return self._target

    @property
    def steered(self) -> bool:
        return self._steered

    @property
    def path(self) -> SocketPath:
        if not self._steered:
            return "shared"
        return "reuseport+migrate" if migration_enabled() else "reuseport"

    @property
    def address(self) -> str:
        if self.spec.kind == "unix":
            return f"unix:{self.spec.address}"
        host, port = self._target.getsockname()[:2]
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"

    @property
    def members(self) -> tuple[socket.socket, ...]:
        return tuple(self._members)

    def instance_socket(self) -> socket.socket:
        """A socket for a new instance. Steered: a new member of the group, which receives no
        connection until :meth:`steer_to` names it (probes aside). Shared: the socket."""
        if not self._steered:
            return self._target
        try:
            sock = _listening_socket(self._target.family, self._target.getsockname(), reuseport=True)
        except OSError as e:
            raise ListenerError(f"cannot listen on {self.spec} once more: {e.strerror or e}") from e
        self._members.append(sock)
        return sock

    def steer_to(self, sock: socket.socket) -> None:
        """Send every new connection to ``sock`` from now on."""
        if not self._steered:
            return
        if sock not in self._members:
            raise ListenerError(f"{self.name}: that socket is not one of this listener's")
        self._target = sock
        self._attach()

    def release(self, sock: socket.socket) -> None:
        """Take ``sock`` out of the group and close it (steered path; a no-op on the shared one).

        Connections still queued on it move to the group's other socket when the kernel migrates
        (``reuseport+migrate``); any process still holding a copy can no longer accept from it.
        """
        if not self._steered or sock is self._target:
            return
        try:
            if sock in self._members:
                try:
                    sock.shutdown(socket.SHUT_RD)  # leaves the group now, whoever else holds a copy
                except OSError:
                    pass  # it had stopped listening already (see _prune)
                self._forget(sock)
                self._attach()
        finally:
            sock.close()

    def queued(self, sock: socket.socket) -> int:
        """Connections waiting on ``sock`` for an instance to accept them."""
        try:
            return accept_queue_length(sock)
        except OSError:
            return 0

    @contextmanager
    def probe_route(self, sock: socket.socket) -> Iterator[tuple[socket.socket, tuple[Any, ...]]]:
        """A fresh client socket and the address to connect it to, such that the connection
        reaches ``sock`` (steered path only); the route ends with the block."""
        if not self._steered:
            raise ListenerError(f"{self.name}: probe routes need the reuseport path")
        family = self._target.family
        destination = _loopback_destination(self._target.getsockname())
        client = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            client.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            port = client.getsockname()[1]
            self._probes[port] = sock
            try:
                self._attach()
                yield client, destination
            finally:
                del self._probes[port]
                self._attach()
        finally:
            client.close()

    @contextmanager
    def probe_connection(self, sock: socket.socket) -> Iterator[tuple[socket.socket, tuple[Any, ...]]]:
        """A fresh client socket and the address to connect it to, such that the connection is
        queued on ``sock``: a probe route on the steered path; on the shared path (TCP) the
        address itself, where any process holding the socket may accept it."""
        if self.spec.kind != "tcp":
            raise ListenerError(f"{self.name}: {self.address} has no accept queue a probe can watch")
        if self._steered:
            with self.probe_route(sock) as route:
                yield route
            return
        if sock is not self._target:
            raise ListenerError(f"{self.name}: that socket is not one of this listener's")
        client = socket.socket(self._target.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            yield client, _loopback_destination(self._target.getsockname())
        finally:
            client.close()

    def close(self) -> None:
        for sock in self._members:
            sock.close()  # close, never shutdown(): an app may still hold its copy
        self._members.clear()
        if self.spec.kind == "unix":
            Path(self.spec.address).unlink(missing_ok=True)

    # --- the group mirror

    def _attach(self) -> None:
        self._prune()
        if not self._members:
            return
        index = {id(sock): i for i, sock in enumerate(self._members)}
        probes = {port: index[id(sock)] for port, sock in self._probes.items() if id(sock) in index}
        program = reuseport_program(index.get(id(self._target), 0), probes)
        try:
            # through a socket in the group: one that stopped listening would get a group of its own
            attach_reuseport_program(self._members[index.get(id(self._target), 0)], program)
        except OSError as e:
            raise ListenerError(f"{self.name}: cannot steer the connections to {self.address}: {e.strerror or e}") from e

    def _prune(self) -> None:
        """Forget members that stopped listening behind our back (an app's ``shutdown()``)."""
        for sock in list(self._members):
            if not _is_listening(sock):
                level = logging.ERROR if sock is self._target else logging.WARNING
                log.log(level, "%s: a socket of %s stopped listening (an app called shutdown() on it)",
                        self.name, self.address)  # fmt: skip
                self._forget(sock)

    def _forget(self, sock: socket.socket) -> None:
        index = self._members.index(sock)
        last = self._members.pop()
        if index < len(self._members):
            self._members[index] = last  # the kernel moves the last socket into the gap


def bind_listeners(specs: tuple[SocketSpec, ...], *, steer: bool = True) -> tuple[Listener, ...]:
    """Bind and listen on every socket; all or nothing.

    ``steer``: TCP sockets take the reuseport path where the kernel allows it; False keeps every
    socket on the shared path.
    """
    listeners: list[Listener] = []
    try:
        for index, spec in enumerate(specs):
            name = spec.name or f"{spec.kind}-{index}"
            if ":" in name:
                raise ListenerError(f"socket name {name!r} must not contain ':' (it separates LISTEN_FDNAMES)")
            listeners.append(_open(name, spec, steer=steer))
    except BaseException:
        close_listeners(listeners)
        raise
    return tuple(listeners)


def close_listeners(listeners: list[Listener] | tuple[Listener, ...]) -> None:
    for listener in listeners:
        listener.close()


def _open(name: str, spec: SocketSpec, *, steer: bool) -> Listener:
    try:
        if spec.kind == "unix":
            _remove_stale_unix_socket(Path(spec.address))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _listen(sock, spec.address)
            except BaseException:
                sock.close()
                raise
            return Listener(name, spec, sock, steered=False)
        family, _, _, _, address = socket.getaddrinfo(
            spec.address, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        if steer:
            sock = _first_member(family, address)
            try:
                return Listener(name, spec, sock, steered=True)
            except ListenerError as e:  # the kernel takes no reuseport program
                sock.close()
                log.info("%s: no reuseport program on this kernel (%s): sharing one socket", spec, e.__cause__)
        return Listener(name, spec, _listening_socket(family, address, reuseport=False), steered=False)
    except OSError as e:
        raise ListenerError(f"cannot listen on {spec}: {e.strerror or e}") from e


def _first_member(family: int, address: Any) -> socket.socket:
    """The group's first socket, on an address nobody else listens on.

    ``SO_REUSEPORT`` would let this socket join another listener of the same user instead of
    failing with "address in use"; a plain socket bound first (and held until the member listens,
    which also pins a port 0 to one number) keeps that check.
    """
    with socket.socket(family, socket.SOCK_STREAM) as guard:
        guard.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        guard.bind(address)
        return _listening_socket(family, guard.getsockname(), reuseport=True)


def _listening_socket(family: int, address: Any, *, reuseport: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it. A server that binds by itself gets it from asyncio, but
        # asyncio leaves it off on a socket passed as an fd whose protocol it cannot see (uvicorn
        # --fd): two writes per response then wait ~40 ms for the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # before bind: joins the group
        _listen(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _listen(sock: socket.socket, address: Any) -> None:
    sock.bind(address)
    sock.listen(socket.SOMAXCONN)
    # Non-blocking from the start and for good: the flag belongs to the shared file
    # description, so flipping it later would change it under a running instance.
    sock.setblocking(False)


def _is_listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def _loopback_destination(bound: tuple[Any, ...]) -> tuple[Any, ...]:
    """Where a local client reaches a listener bound to ``bound`` (a wildcard means loopback)."""
    host = bound[0]
    if host == "0.0.0.0":
        return ("127.0.0.1", bound[1])
    if host == "::":
        return ("::1", *bound[1:])
    return bound


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

