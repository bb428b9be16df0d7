"""Find processes by an entry in their environment, and end them.

Processes started for one purpose carry a marker variable (``SSHFWUP_SUPERVISOR=<marker>`` for
the app, ``SSHFWUP_SIM_MACHINE=<dir>`` under a simulated machine). The marker is inherited by
everything they start, also by what leaves their session or process group, so scanning
``/proc/*/environ`` finds them all, however deep. A zombie counts as gone: it holds no sockets,
mounts or files any more and only waits for its parent to reap it. The caller and its ancestors
are never found, even when they carry the marker themselves.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ProcessRef",
    "Sweep",
    "alive",
    "argv",
    "children",
    "command_line",
    "end_processes_with",
    "processes_with",
    "processes_with_variables",
    "send_signal",
    "ssh_front",
    "start_time",
    "wait_gone",
]

_POLL = 0.02


@dataclass(frozen=True)
class Sweep:
    """What :func:`end_processes_with` did: the pids it signalled, those still alive, and those
    it had to SIGKILL (the others exited within the grace period)."""

    signalled: tuple[int, ...]
    survivors: tuple[int, ...]
    killed: tuple[int, ...] = ()


def _read(pid: int | str, name: str) -> bytes | None:
    """``/proc/<pid>/<name>``; None if the process is gone, or not ours to read."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return None


def _stat_after_comm(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name: state, ppid, ...; None if gone."""
    stat = _read(pid, "stat")
    if stat is None:
        return None
    # "pid (comm) S ppid ..." — comm may hold spaces and parentheses: split after the last ")"
    return stat[stat.rfind(b")") + 1 :].decode(errors="replace").split()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (or sleeps, or is stopped); False once it is gone or a zombie."""
    fields = _stat_after_comm(pid)
    if not fields:
        return False
    return fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat`` field 22); None if
    it is gone. With the pid it names one process: a pid the kernel reuses has another start."""
    fields = _stat_after_comm(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22 of stat; fields[0] is field 3 (the state)
    except ValueError:
        return None


def argv(pid: int) -> list[str]:
    """``/proc/<pid>/cmdline`` as a list; empty when gone, unreadable or a kernel thread."""
    raw = _read(pid, "cmdline")
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg] if raw else []


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a scan of /proc)."""
    kids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_after_comm(int(entry.name))
            if fields and len(fields) > 1 and fields[1] == str(pid):
                kids.append(int(entry.name))
    return kids


def ssh_front(server_pid: int) -> int | None:
    """The SSH front of the ``sshfwup serve`` whose pid is ``server_pid``: its child started
    with ``--front`` (docs/ARCHITECTURE.md, "Two processes"); None while none runs."""
    for kid in children(server_pid):
        if "--front" in argv(kid):
            return kid
    return None


def command_line(pid: int) -> str:
    """``/proc/<pid>/cmdline`` as one line (for messages), or "?" when it cannot be read."""
    return " ".join(argv(pid))[:300] or "?"


@dataclass(frozen=True)
class ProcessRef:
    """One process, also after its pid is reused: its pid and its start time."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef | None:
        start = start_time(pid)
        return None if start is None else cls(pid, start)

    @classmethod
    def parse(cls, text: str) -> ProcessRef | None:
        """From :attr:`token` (``"PID:START"``); None if malformed."""
        pid, sep, start = text.strip().partition(":")
        if not sep or not pid.isdigit() or not start.isdigit():
            return None
        return cls(int(pid), int(start))

    @property
    def token(self) -> str:
        return f"{self.pid}:{self.start}"

    def alive(self) -> bool:
        """True while this very process runs: not gone, not a zombie, and not another process
        that got the same pid."""
        return alive(self.pid) and start_time(self.pid) == self.start


def _own_lineage() -> set[int]:
    """This process and its ancestors."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        fields = _stat_after_comm(pid)
        if fields is None or len(fields) < 2:
            break
        pid = int(fields[1])
    return pids


def processes_with(entry: str) -> list[int]:
    """Sorted pids of the live processes whose environment holds ``entry`` (``NAME=value``)."""
    name, _, value = entry.partition("=")
    return sorted(pid for pid, carried in processes_with_variables([name]).items() if carried[name] == value)


def processes_with_variables(names: Iterable[str]) -> dict[int, dict[str, str]]:
    """Live processes (the caller's lineage aside) that carry any of the environment variables
    ``names``: pid → {name: value} of those it carries."""
    prefixes = {f"{name}=".encode(): name for name in names}
    own = _own_lineage()
    found: dict[int, dict[str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in own:
            continue
        environ = _read(entry, "environ")
        if not environ:
            continue
        carried = {}
        for item in environ.split(b"\0"):
            for prefix, name in prefixes.items():
                if item.startswith(prefix):
                    carried[name] = item[len(prefix) :].decode(errors="replace")
        if carried and alive(int(entry)):
            found[int(entry)] = carried
    return found


def send_signal(pid: int, signum: int) -> bool:
    """Signal ``pid``; False if it no longer exists."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` seconds for every pid to be gone; the ones still alive."""
    deadline = time.monotonic() + timeout
    pending = [pid for pid in pids if alive(pid)]
    while pending and time.monotonic() < deadline:
        time.sleep(_POLL)
        pending = [pid for pid in pending if alive(pid)]
    return pending


def end_processes_with(entry: str, *, grace: float = 0.0, timeout: float = 5.0) -> Sweep:
    """End every process whose environment holds ``entry``, and wait until they are gone.

    With ``grace`` > 0 they get SIGTERM first and that long to exit. Then SIGKILL, repeated
    until none is found any more or ``timeout`` has passed: a dying parent may just have forked.
    At least one round of SIGKILL is sent, even with ``timeout`` 0.
    """
    signalled: set[int] = set()
    killed: set[int] = set()
    if grace > 0:
        pids = processes_with(entry)
        signalled.update(pid for pid in pids if send_signal(pid, signal.SIGTERM))
        wait_gone(pids, grace)
    deadline = time.monotonic() + timeout
    while pids := processes_with(entry):
        killed.update(pid for pid in pids if send_signal(pid, signal.SIGKILL))
        if wait_gone(pids, max(0.0, deadline - time.monotonic())) or time.monotonic() >= deadline:
            break
    signalled |= killed
    return Sweep(tuple(sorted(signalled)), tuple(processes_with(entry)), tuple(sorted(killed)))
