"""The reuseport program: which socket of a reuseport group receives a new connection.

On the steered socket paths (:mod:`sshfwup.supervisor.listeners`) every instance of the app has a
listening socket of its own in one reuseport group. A classic BPF program attached to the group
(``SO_ATTACH_REUSEPORT_CBPF``) returns, for each new connection, the index of the socket it goes
to: the supervisor's choice, and for a readiness probe from a source port of its own, the probed
instance's socket. The kernel numbers a group's sockets in the order they started listening
(``listen()``); when one leaves, the last one takes its number, and a program answer beyond the
last number falls back to the kernel's hash (:class:`~sshfwup.supervisor.listeners.Listener`
mirrors that order).

With ``net.ipv4.tcp_migrate_req = 1`` (Linux >= 5.14) the connections still queued on a socket
that leaves the group move to another socket of it (:func:`migration_enabled`).
"""

from __future__ import annotations

import array
import socket
import struct
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Instruction", "attach_reuseport_program", "migration_enabled", "reuseport_program"]

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

