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
socket (uvicorn ``--fd 3``) can be probed without any code of its own.

Each instance also gets a notify socket for its sd_notify messages and, for ``http``/``tcp``
readiness, a private health listener on 127.0.0.1 that only the supervisor's probes connect to.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import anyio

from . import sockdiag
from sshfwup.config import SocketSpec

__all__ = [
    "AcceptStalled",
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

_ACCEPT_POLL = 0.01  # how often a probe looks at an accept queue
_TCPI_UNACKED_OFFSET = 24  # struct tcp_info: 8 one-byte fields, rto, ato, snd_mss, rcv_mss, unacked
_MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")  # per network namespace, IPv6 too
# asm-generic value; the few architectures that number it differently (parisc, sparc) are not
# device targets, and there the kernel refuses the option: the shared path is used.
_SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)

# Classic BPF (linux/filter.h). A reuseport program sees the packet from the TCP payload on;
# loads at _SKF_NET_OFF + n read byte n of the IP header instead.
_LD, _LDX, _ALU, _JMP, _RET = 0x00, 0x01, 0x04, 0x05, 0x06
_H, _B = 0x08, 0x10
_ABS, _IND, _MSH = 0x20, 0x40, 0xA0
_RSH, _JA, _JEQ, _K = 0x70, 0x00, 0x10, 0x00
_SKF_NET_OFF = -0x100000
_IPPROTO_TCP = 6

Instruction = tuple[int, int, int, int]  # code, jt, jf, k


class ListenerError(Exception):
    """A listening socket cannot be set up (address in use, bad name, a file in the way)."""


# --- the reuseport program ------------------------------------------------------------------


def reuseport_program(target: int, probes: Mapping[int, int] | None = None) -> list[Instruction]:
    """A program answering ``target`` for every connection, except that a connection from a
    source port in ``probes`` goes to the index ``probes[port]``.

    The source port is read from the IP header's end: IPv4 (its length from the header) or IPv6
    (directly followed by TCP; with extension headers, ``target``). A dual-stack IPv6 socket sees
    IPv4 packets for IPv4 clients, hence the version check.
    """
    if not probes:
        return [(_RET | _K, 0, 0, target)]
    checks: list[Instruction] = []
    for port, index in probes.items():
        checks += [(_JMP | _JEQ | _K, 0, 1, port), (_RET | _K, 0, 0, index)]
    to_default = 4 + len(checks)  # from instruction 4 to the final "ret target"
    if to_default > 255:
        raise ValueError(f"too many probe routes at once: {len(probes)}")
    return [
        (_LD | _B | _ABS, 0, 0, _SKF_NET_OFF & 0xFFFFFFFF),  # 0: A = first byte of the IP header
        (_ALU | _RSH | _K, 0, 0, 4),  # 1: A = IP version
        (_JMP | _JEQ | _K, 0, 4, 6),  # 2: IPv6 → 3, else IPv4 → 7
        (_LD | _B | _ABS, 0, 0, (_SKF_NET_OFF + 6) & 0xFFFFFFFF),  # 3: A = IPv6 next header
        (_JMP | _JEQ | _K, 0, to_default, _IPPROTO_TCP),  # 4: extension headers → default
        (_LD | _H | _ABS, 0, 0, (_SKF_NET_OFF + 40) & 0xFFFFFFFF),  # 5: A = TCP source port
        (_JMP | _JA, 0, 0, 2),  # 6: → checks
        (_LDX | _B | _MSH, 0, 0, _SKF_NET_OFF & 0xFFFFFFFF),  # 7: X = IPv4 header length
        (_LD | _H | _IND, 0, 0, _SKF_NET_OFF & 0xFFFFFFFF),  # 8: A = TCP source port
        *checks,
        (_RET | _K, 0, 0, target),
    ]


def attach_reuseport_program(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach ``program`` to the reuseport group of ``sock``, replacing the group's program."""
    code = array.array("B", b"".join(struct.pack("=HBBI", *insn) for insn in program))
    address, _ = code.buffer_info()
    fprog = struct.pack("@HP", len(program), address)  # struct sock_fprog, native layout
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)  # the kernel copies `code` here


def migration_enabled() -> bool:
    """``net.ipv4.tcp_migrate_req`` is on: a closing listener's queue moves to its group."""
    try:
        return _MIGRATE_SYSCTL.read_text().strip() == "1"
    except OSError:  # Linux < 5.14: no such setting
        return False


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
