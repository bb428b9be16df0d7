"""One instance of the app: where it runs from, the process and what belongs to it alone, how it ended.

:class:`AppSource` is the tree an instance runs from; :class:`Instance` a snapshot of one app
process, as the supervisor's callers see it; :class:`AppExit` how an instance ended when nobody
asked it to; :class:`Outage` why no version runs. :class:`Child` is the supervisor's own record of a
process it started (its notify and health sockets, hand-off channel, last output lines), and
:class:`Roster` the instances the supervisor's parts share: every process started and not yet
gone, and the one that serves.

Every part of the supervisor logs as one logger, ``sshfwup.supervisor.supervisor``
(:data:`LOGGER`): the name operators' log configurations, the benchmarks and the tests know.
"""

from __future__ import annotations

import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

if TYPE_CHECKING:  # imported when an app has [app] handoff on
    from . import handoff_relay

__all__ = [
    "LAST_OUTPUT_LINES",
    "LOGGER",
    "AppExit",
    "AppSource",
    "Child",
    "Instance",
    "Outage",
    "Roster",
    "describe_exit",
    "seconds",
]

LOGGER = "sshfwup.supervisor.supervisor"
LAST_OUTPUT_LINES = 20  # an instance's last lines of output kept for `status` (AppExit.output)


@dataclass(frozen=True)
class AppSource:
    """The tree an instance runs from: the running root, or a mounted new slot after a swap."""

    root: Path
    slot: str
    version: str

    def app_dir(self, app_dir: str) -> Path:
        """``app_dir`` is absolute inside the root filesystem: join it below ``root``."""
        return self.root / app_dir.lstrip("/")


@dataclass(frozen=True)
class Instance:
    """A snapshot of one app process. Times are ``time.monotonic()`` (uptime = now - started_at)."""

    pid: int
    source: AppSource
    started_at: float
    ready_at: float | None
    restarts: int  # crash restarts that led to this process
    returncode: int | None = None  # None while it runs; negative: killed by that signal
    status: str = ""  # the last STATUS= the app sent

    @property
    def version(self) -> str:
        return self.source.version

    def describe_exit(self) -> str:
        """"exited with status 3", "was killed by SIGKILL", "is running"."""
        return describe_exit(self.returncode)


@dataclass(frozen=True)
class AppExit:
    """How an instance of the app ended when nobody asked it to — a crash, a failed start, or
    a failed new version stopped by its swap — for ``status``."""

    version: str
    slot: str
    pid: int
    returncode: int | None  # negative: killed by that signal
    at: float  # time.time() when it ended
    reason: str  # "2.0.0 exited with status 3 before it became ready"
    output: tuple[str, ...] = ()  # its last lines of stdout/stderr, oldest first

    @property
    def exit_code(self) -> int | None:
        return self.returncode if self.returncode is not None and self.returncode >= 0 else None

    @property
    def signal(self) -> str | None:
        if self.returncode is None or self.returncode >= 0:
            return None
        return _signal_name(-self.returncode)

    def to_json(self) -> dict[str, object]:
        return {
            "version": self.version,
            "slot": self.slot,
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "at": round(self.at, 3),
            "reason": self.reason,
            "output": list(self.output),
        }


@dataclass(frozen=True)
class Outage:
    """No version of the app runs: since when (``time.monotonic()``), why, and when the next
    start attempt is due (None: not known to the supervisor, e.g. the daemon retries a start)."""

    reason: str
    since: float
    next_attempt: float | None = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_exit(returncode: int | None) -> str:
    """"exited with status 3", "was killed by SIGKILL", "is running"."""
    if returncode is None:
        return "is running"
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with status {returncode}"


def seconds(value: float) -> str:
    """A duration for the lines operators read: "10 s", "0.25 s"."""
    return f"{value:g} s"


class Child:
    """One app process and what belongs to it alone (notify socket, health socket)."""

    def __init__(
        self,
        process: anyio.abc.Process,
        source: AppSource,
        *,
        instance_id: str,
        sockets: tuple[socket.socket, ...],
        notify: socket.socket,
        health: socket.socket | None,
        restarts: int,
        failures: int,
    ) -> None:
        self.process = process
        self.source = source
        self.instance_id = instance_id
        self.sockets = sockets  # one per listener, as passed (fds 3..)
        self.notify = notify
        self.health = health
        self.restarts = restarts
        self.failures = failures  # consecutive crashes before this start: the backoff exponent
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self.returncode: int | None = None
        self.status = ""
        self.ready = anyio.Event()  # READY=1 arrived
        self.exited = anyio.Event()
        self.supervised = False  # an exit is the restart loop's business (never during start/swap)
        self.stopping = False
        self.cgroup: Path | None = None  # its own cgroup (sshfwup.supervisor.room), if it has one
        self.drain_deadline: float | None = None  # set with SIGTERM: when SIGKILL comes
        self.handoff: handoff_relay.Channel | None = None  # [app] handoff: its channel (sshfwup.app.handoff)
        self.owes_verdict = False  # it was asked to GIVE and waits for DONE or KEEP
        self.gave_away = False  # told DONE: its state and connections belong to the next version
        self.taken: handoff_relay.Transfer | None = None  # what it took over from the version before
        self.output: deque[str] = deque(maxlen=LAST_OUTPUT_LINES)  # its last lines, for AppExit
        self.failure: str | None = None  # why the supervisor stops it as failed (not ready, rolled back)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def version(self) -> str:
        return self.source.version

    def describe_exit(self) -> str:
        return describe_exit(self.returncode)

    def snapshot(self) -> Instance:
        return Instance(
            self.pid, self.source, self.started_at, self.ready_at, self.restarts, self.returncode, self.status
        )


@dataclass(eq=False)
class Roster:
    """The supervisor's instances, which its parts share; the Supervisor owns it, and its lock
    orders every change but the launcher's bookkeeping of exits."""

    current: Child | None = None  # the app process: running, starting, or crashed and waiting for its restart
    children: set[Child] = field(default_factory=set)  # started and not yet gone (the launcher keeps it)
    closing: bool = False  # the supervisor is leaving its block: an exit is no crash, no outage

    def others(self, child: Child) -> list[Child]:
        """The instances besides ``child`` whose main process still runs."""
        return [c for c in self.children if c is not child and c.process.returncode is None]

    def any_running(self) -> bool:
        return any(child.process.returncode is None for child in self.children)
