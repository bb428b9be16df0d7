"""Give up Linux capabilities for good: from the bounding set (nothing this process execs gets
them back, root or not) and from the effective, permitted and inheritable sets.

The SSH front (``sshfwup/ssh/front.py``) parses every byte a client sends; it drops what only the
supervisor needs (binding port 22, the app's user and groups, signalling and reading other
users' processes) and what nothing of sshfwup needs at all. docs/security.md has the table.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)

__all__ = ["CAPABILITIES", "FRONT_DROPS", "CapabilityError", "drop", "held"]

#: Linux's numbers (linux/capability.h) for the capabilities named here.
CAPABILITIES = {
    "CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3, "CAP_FSETID": 4,
    "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10, "CAP_NET_BROADCAST": 11, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14, "CAP_IPC_OWNER": 15, "CAP_SYS_MODULE": 16, "CAP_SYS_RAWIO": 17, "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19, "CAP_SYS_PACCT": 20, "CAP_SYS_ADMIN": 21, "CAP_SYS_BOOT": 22, "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24, "CAP_SYS_TIME": 25, "CAP_SYS_TTY_CONFIG": 26, "CAP_MKNOD": 27, "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29, "CAP_AUDIT_CONTROL": 30, "CAP_SETFCAP": 31, "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33, "CAP_SYSLOG": 34, "CAP_WAKE_ALARM": 35, "CAP_BLOCK_SUSPEND": 36, "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38, "CAP_BPF": 39, "CAP_CHECKPOINT_RESTORE": 40,
}  # fmt: skip

#: What the SSH front gives up at start. It keeps what the update path needs — CAP_SYS_ADMIN
#: (mounting the new slot; fwup's and fw_setenv's block-device ioctls), CAP_DAC_OVERRIDE and
#: CAP_DAC_READ_SEARCH (the disk, the env device, /data), CAP_SYS_BOOT (reboot) — and, not
#: examined one by one, what fwup or a board's tools may use: CAP_SYS_RAWIO, CAP_MKNOD,
#: CAP_SYS_RESOURCE, CAP_SYS_NICE and file ownership (CAP_CHOWN, CAP_FOWNER, CAP_FSETID).
FRONT_DROPS = (
    # the supervisor's: port 22 is bound before the front starts; the app's room; the app's processes
    "CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_PTRACE", "CAP_SETFCAP",
    # nothing of sshfwup's
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BROADCAST", "CAP_SYS_MODULE", "CAP_SYS_TIME", "CAP_SYS_CHROOT",
    "CAP_SYS_PACCT", "CAP_SYS_TTY_CONFIG", "CAP_LINUX_IMMUTABLE", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
    "CAP_SETPCAP",  # last: dropping from the bounding set needs it
)  # fmt: skip

_PR_CAPBSET_READ, _PR_CAPBSET_DROP = 23, 24
_CAPABILITY_VERSION_3 = 0x20080522


class CapabilityError(OSError):
    """A capability could not be given up; the message names it and why."""


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def held(field: str = "CapEff", pid: int | str = "self") -> set[str]:
    """The capabilities in one set of ``/proc/PID/status`` (CapEff, CapPrm, CapBnd, ...)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                bits = int(line.split()[1], 16)
                return {name for name, number in CAPABILITIES.items() if bits >> number & 1}
    raise CapabilityError(f"/proc/{pid}/status has no {field} line")


def drop(names: Iterable[str]) -> list[str]:
    """Give up ``names`` for this process and whatever it execs; returns those it held before.
    CapabilityError if the kernel refuses (then nothing more is tried)."""
    numbers = [(name, CAPABILITIES[name]) for name in names]
    libc = ctypes.CDLL(None, use_errno=True)
    had = [name for name, number in numbers if libc.prctl(_PR_CAPBSET_READ, number, 0, 0, 0) == 1]
    for name, number in numbers:  # the bounding set first: CAP_SETPCAP (dropped last) allows it
        if libc.prctl(_PR_CAPBSET_READ, number, 0, 0, 0) == 1 and libc.prctl(_PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
            raise CapabilityError(f"cannot drop {name} from the bounding set: {os.strerror(ctypes.get_errno())}")
    header = _Header(_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise CapabilityError(f"capget: {os.strerror(ctypes.get_errno())}")
    for _name, number in numbers:
        word, bit = divmod(number, 32)
        keep = ~(1 << bit) & 0xFFFFFFFF
        data[word].effective &= keep
        data[word].permitted &= keep
        data[word].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise CapabilityError(f"capset: {os.strerror(ctypes.get_errno())}")
    return had
