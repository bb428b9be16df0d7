"""Is a TCP port free to listen on, and if not, who holds it?

Used by ``sshfwup serve`` when it cannot bind (its message names the holder) and by the
simulated machine before it boots (a taken port is one clear error, not a restart loop). Only
the standard library and ``/proc``: ``serve`` imports this, and it must stay lean.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

__all__ = ["ListenError", "PortHolder", "bind_ssh", "bind_tcp", "describe_holders", "port_holders", "port_problem"]

_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


class ListenError(Exception):
    """A socket the service must listen on cannot be bound (the port is taken, or not allowed).
    ``sshfwup serve`` exits with its own status for it, so a service manager can tell it apart
    from a crash and not restart it in a loop."""


@dataclass(frozen=True)
class PortHolder:
    """A process with a socket on the port: ``listening`` unless it only uses it as its local
    port (an outgoing connection)."""

    pid: int
    command: str
    listening: bool


def _socket_inodes(port: int) -> dict[int, bool]:
    """Inodes of this network namespace's TCP sockets whose local port is ``port`` → listening?"""
    found: dict[int, bool] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii", errors="replace") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            # "  0: 0100007F:08AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0  0 12345 ..."
            fields = line.split()
            if len(fields) < 10 or ":" not in fields[1]:
                continue
            try:
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                inode = int(fields[9])
            except ValueError:
                continue
            if local_port == port and inode:
                found[inode] = found.get(inode, False) or fields[3] == _TCP_LISTEN
    return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:200] or "?"


def port_holders(port: int) -> list[PortHolder]:
    """The processes (that this user may see) with a TCP socket on local port ``port``, listeners
    first. Empty when nothing holds it, or when the holder's /proc entries are not readable."""
    inodes = _socket_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{inode}]": listening for inode, listening in inodes.items()}
    holders: dict[int, bool] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target in wanted:
                pid = int(name)
                holders[pid] = holders.get(pid, False) or wanted[target]
    return sorted(
        (PortHolder(pid, _command(pid), listening) for pid, listening in holders.items()),
        key=lambda h: (not h.listening, h.pid),
    )


def describe_holders(port: int) -> str:
    """``"held by pid 12 (python3 -m http.server 2222)"``, or a sentence saying it cannot tell."""
    holders = port_holders(port)
    if not holders:
        return "no process this user can see holds it"
    parts = [f"pid {h.pid} ({h.command}{'' if h.listening else ', as a connection'})" for h in holders[:3]]
    more = f" and {len(holders) - 3} more" if len(holders) > 3 else ""
    return "held by " + ", ".join(parts) + more


def port_problem(host: str, port: int) -> str | None:
    """Why a listener could not bind ``host:port`` now, with who holds it; None when it could.

    Binds with SO_REUSEADDR like the servers do, so connections in TIME_WAIT (which do not stop
    a server from starting) are not reported. Only a check: the port may be taken right after.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use: {describe_holders(port)}"
            return f"cannot bind {host}:{port}: {e.strerror or e}"
    return None


def bind_tcp(host: str, port: int, *, backlog: int = 128) -> list[socket.socket]:
    """Listening TCP sockets on ``host:port``, one per address it resolves to (port 0 on several
    addresses: all on the port the first one got). OSError as bind's; nothing is left open."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            first = sockets[0].getsockname()[1] if len(sockets) > 1 else 0
            sock.bind(address if port else (*address[:1], first, *address[2:]))
            sock.listen(backlog)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_ssh(listen: str, port: int) -> list[socket.socket]:
    """The SSH port's listening sockets ([server] listen, port). ListenError names the setting
    and who holds the port: bind's own message names neither, and an operator needs both."""
    try:
        return bind_tcp(listen, port)
    except OSError as e:
        where = f"{listen}:{port}"
        holder = f"; {describe_holders(port)}" if e.errno == errno.EADDRINUSE else ""
        reason = os.strerror(e.errno).lower() if e.errno else str(e)
        raise ListenError(f"cannot listen for SSH on {where} ([server] listen, port): {reason}{holder}") from e
