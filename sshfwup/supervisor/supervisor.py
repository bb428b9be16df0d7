"""Run the device's application, and swap it to a new version without refusing a connection.

The supervisor binds the application's listening sockets itself and keeps a copy of each for
its whole life; every instance of the app gets them as fds 3.. with systemd's ``LISTEN_*``
variables (see :mod:`sshfwup.app`). Because the supervisor's copy never closes, a connection that
arrives while an instance (re)starts waits in the kernel's listen queue instead of being refused.

How a TCP socket goes from one version to the next — its *socket path*, see
:mod:`sshfwup.supervisor.listeners` — is ``reuseport`` (``reuseport+migrate`` with
``net.ipv4.tcp_migrate_req = 1``) wherever the kernel takes a reuseport program: each version
gets a listening socket of its own on the same address, and the supervisor steers new
connections to one of them. UNIX sockets, kernels without the program and ``Supervisor(...,
steer=False)`` use the ``shared`` path: one socket for every version.

A swap (``overlap``, the default): start the new version from the new slot → wait until it is
ready → *hand over*: steer new connections to the new version's sockets, let the old version
accept what is already queued on its own, and wait until its queues stayed empty for a short
quiet period → SIGTERM the old one (it closes its copies of the listeners, finishes its requests
and exits; SIGKILL after ``drain_timeout``) → release its sockets → watch the new one for
``observe`` seconds. A draining server therefore never holds a connection whose request it has
not read yet (servers close those on shutdown: "connection reset" for the client). On the shared
path there is nothing to hand over: both versions accept from one queue until the old one drains.
``stop-first`` hands over to the new version's (not yet served) sockets and stops the old version
before starting the new one, for apps that hold an exclusive resource; connections wait in the
queue meanwhile. If the new version fails at any point, it is stopped and the old version keeps
serving — new connections are steered back to it — or is started again from its own slot on the
sockets that receive new connections when it had already been stopped, and :class:`SwapFailed`
says why in words an operator understands. :class:`SwapResult` says which socket path was used.

Readiness: ``notify`` waits for ``READY=1`` on a notify socket private to the instance.
``http`` and ``tcp`` probe a private listening socket (127.0.0.1, passed last, named ``health``):
a probe through the shared socket could be answered by the *old* version during an overlap. The
app must therefore serve every socket it is given — except for ``http`` when the first TCP
socket is on the reuseport path: the probe then goes through the public address to the
instance's own copy of that socket (the reuseport program routes the probe's source port there),
so an app serving only fd 3 (uvicorn ``--fd 3``) can be probed too. The ``health`` socket is
passed all the same, so that LISTEN_FDS does not depend on the kernel. ``http``: ``GET
ready_path`` answers 2xx. ``tcp``: the app accepted the probe connection — seen as the private
listener's accept queue (``TCP_INFO``) emptying again; on loopback the kernel queues the
connection before ``connect()`` returns.

Health is proved on the sockets clients use, not announced: in every readiness mode an instance
is ready only once it has also accepted a probe connection on each of its public TCP sockets
(:func:`listeners.accept_probe`), within ``ready_timeout`` — an app that sends READY=1 but
listens on a port of its own is not ready. A probe is sent only where no other instance could
accept it: to the instance's own socket on the reuseport paths (routed there by the program,
before the hand-over, while the old version still serves everyone else); on the shared path only
while no other instance runs — during an overlap that means once the old version drained, before
the swap completes (a failure then starts the old version again). UNIX sockets have no accept
queue to watch: there READY=1 (or the private probe) is all the proof. During the observation
window the process must stay alive and, every ``health_interval``, pass the http/tcp probe and
accept a probe connection on each public socket; boot validation runs the same checks
(:meth:`Supervisor.watch_health`, :meth:`Supervisor.check_health`).

Saturated is not dead (issue #20): at full load a probe connection may wait in the accept queue
behind busy workers, and that passes once it is accepted. A version is unhealthy when it makes no
progress: it exits; a probe connection waits while nothing at all is accepted on that socket for
``stall_timeout`` (:func:`listeners.accept_probe`; the kernel says when the probe itself is
accepted, :mod:`sshfwup.supervisor.sockdiag`); its http/tcp check does not answer within ``stall_timeout``;
or that check answers with a failure ``health_failures`` rounds in a row.

Outside a swap, an instance that exits is restarted from the same source, on the same sockets,
with exponential backoff (``restart_backoff``: first delay, maximum; a crash after running at
least the maximum delay starts again from the first) once the processes it left behind are gone.
An exit during a swap belongs to the swap, never to the restart loop. After
``rollback_after_crashes`` failures in a row the ``on_crash_loop`` handler may name another
source to start instead (the daemon's: the running root's firmware for a hot-swapped version).

Each instance runs with cwd = ``root/app_dir`` (``app_dir`` is absolute inside the root
filesystem), in its room (:mod:`sshfwup.supervisor.room`: its own user, capabilities and cgroup, a clean
environment), plus ``[app] env`` (``{root}`` and ``{app_dir}``
are substituted there and in ``command``), ``PYTHONPATH`` starting with the app dir,
``SSHFWUP_SLOT``, ``SSHFWUP_VERSION``, ``SSHFWUP_APP_ROOT`` (the root), ``SSHFWUP_APP_DIR``,
``NOTIFY_SOCKET`` and ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``. It is started through the
exec shim in :mod:`sshfwup.app` (``pass_fds`` keeps the parent's fd numbers; the shim moves them
to 3.. and sets ``LISTEN_PID`` in the process that then execs the app), in a session of its own
so that SIGKILL reaches its whole process group.

While no instance runs — it crashed and waits for its restart, or it does not start — the
supervisor itself answers on the public sockets once ``[app] unavailable_after`` seconds passed
without one (:mod:`sshfwup.supervisor.unavailable`): ``503 Service Unavailable`` with the reason on the
sockets named in ``[app] http_sockets``, a reset on the others, so that clients get an answer
instead of waiting in the queue until they give up. It stops before any instance is started
(a start, a swap, a restart attempt, a stop all take the supervisor's lock, and stand it down
first), so it never takes a connection an instance could accept. :attr:`Supervisor.last_exit`
keeps how the last instance that failed ended and its last lines of output;
:attr:`Supervisor.outage` why no version runs now.

Every app process carries ``SSHFWUP_SUPERVISOR=<marker>`` in its environment and dies with the
supervisor (``PR_SET_PDEATHSIG``); :func:`kill_strays` removes what an earlier server left behind.
The marker must be the same for every run of one device's server and unique to it. Processes an
instance leaves behind when its main process exits (a multiprocessing resource tracker, an
orphaned worker) get SIGTERM and the rest of the drain time to exit on their own, then SIGKILL;
an instance counts as gone — and its sockets are released — only once all of them are.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.abc

from sshfwup import app as app_protocol
from . import listeners, logring, room, unavailable
from sshfwup.system import procs
from sshfwup.config import AppConfig, SocketSpec
from sshfwup.supervisor.listeners import Listener

if TYPE_CHECKING:  # imported when an app has [app] handoff on
    from . import handoff_relay

__all__ = [
    "HEALTH_SOCKET_NAME",
    "MARKER_VARIABLE",
    "AppExit",
    "AppNotReady",
    "AppSource",
    "Outage",
    "CrashLoopHandler",
    "Instance",
    "Listener",
    "SupervisorError",
    "SwapFailed",
    "SwapResult",
    "Supervisor",
    "bind_listeners",
    "kill_strays",
    "marked_processes",
]

log = logging.getLogger(__name__)

MARKER_VARIABLE = "SSHFWUP_SUPERVISOR"
INSTANCE_VARIABLE = "SSHFWUP_INSTANCE"  # one value per started process: finds what it left behind
HEALTH_SOCKET_NAME = "health"
_INHERITED_PROTOCOL_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET")
_EXEC_SHIM = Path(app_protocol.__file__)
_KILL_WAIT = 5.0  # a SIGKILLed process is gone well within this
_REPORT_TIMEOUT = 5.0  # a stuck uploader channel must not stall a swap
_PROBE_RETRY = 0.05
_OUTPUT_DRAIN = 1.0  # after an exit, the app's last output lines still get this long to arrive
_app_output = logging.getLogger(logring.APP_LOGGER)
# One debug line per health check that passed, with how long it waited (``health_wait``):
# bench/stock_servers.py reports the longest under load, what [app] stall_timeout must stay above.
_health_log = logging.getLogger(f"{__name__}.health")
# The hand-over: the old version's queues must stay empty this long before it gets SIGTERM, so
# that it has read the requests of the connections it accepted last; bounded for an old version
# that stopped accepting.
_HANDOVER_QUIET = 0.25
_HANDOVER_LIMIT = 5.0
_HANDOVER_POLL = 0.01

Report = Callable[[str], Awaitable[None] | None]
_CRASH_LOOP_TIMEOUT = 120.0  # the crash-loop handler's bound (it may wait for the update lock)
LAST_OUTPUT_LINES = 20  # an instance's last lines of output kept for `status` (AppExit.output)
_STAND_IN_CONNECTIONS = 32  # 503 answers in progress at once; beyond, connections are reset


class SupervisorError(Exception):
    """The application cannot be run as asked (nothing configured, socket in use, ...)."""


class AppNotReady(SupervisorError):
    """The application did not become ready; ``reason`` says why."""

    def __init__(self, reason: str, *, pid: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pid = pid


class SwapFailed(SupervisorError):
    """The new version failed; it was stopped and the old version serves (or is being restarted).

    ``reason``: what the new version did ("2.0.0 did not become ready within 10 s");
    ``rollback``: what serves now ("1.0.0 is still serving (pid 123)").
    """

    def __init__(
        self, reason: str, *, rollback: str, new_pid: int | None, restored: Instance | None
    ) -> None:
        super().__init__(f"{reason}; {rollback}")
        self.reason = reason
        self.rollback = rollback
        self.new_pid = new_pid
        self.restored = restored


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
        return _describe_exit(self.returncode)


@dataclass(frozen=True)
class SwapResult:
    strategy: Literal["overlap", "stop-first"]
    old_version: str
    new_version: str
    old_pid: int
    new_pid: int
    ready_seconds: float  # new version: start → ready
    drain_seconds: float  # old version: SIGTERM → exited
    observe_seconds: float
    total_seconds: float
    old_returncode: int | None  # -9 when it had to be killed
    ready_at: float  # time.monotonic() when the new version was ready: it serves from then on
    # "reuseport+migrate", "reuseport" or "shared" ("name=path, ..." when the sockets differ)
    socket_path: str = "shared"
    handover_seconds: float = 0.0  # steering new connections away from the old version → its SIGTERM
    handoff: str = ""  # [app] handoff: "handed over 3 connections, 1.2 KiB of state" or "no hand-off: why"


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


#: ``Supervisor(on_crash_loop=...)``: called once the app failed ``[app] rollback_after_crashes``
#: times in a row, with the last failed instance and that count, before the next restart. Returns
#: the source to start instead (at once), or None to go on restarting the same one with backoff.
CrashLoopHandler = Callable[[Instance, int], Awaitable[AppSource | None]]


# --- sockets and strays --------------------------------------------------------------------


def bind_listeners(specs: tuple[SocketSpec, ...], *, steer: bool = True) -> tuple[Listener, ...]:
    """Bind and listen on every socket; all or nothing (see :mod:`sshfwup.supervisor.listeners`)."""
    try:
        return listeners.bind_listeners(specs, steer=steer)
    except listeners.ListenerError as e:
        raise SupervisorError(str(e)) from e


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes whose environment carries ``SSHFWUP_SUPERVISOR=<marker>``."""
    return procs.processes_with(f"{MARKER_VARIABLE}={marker}")


def kill_strays(marker: str, *, timeout: float = 2.0) -> list[int]:
    """SIGKILL app processes left behind by an earlier server with the same marker.

    Normally none exist (apps die with their server); this covers a server that was killed
    while an app had detached itself. Waits up to ``timeout`` for them to be gone, so that their
    listening sockets are free again. Returns the pids it killed.
    """
    pids = list(procs.end_processes_with(f"{MARKER_VARIABLE}={marker}", timeout=timeout).signalled)
    if pids:
        log.warning("killed %d application process(es) left by an earlier server: %s", len(pids), pids)
    return pids


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "is running"
    if returncode < 0:
        return f"was killed by {_signal_name(-returncode)}"
    return f"exited with status {returncode}"


def _seconds(value: float) -> str:
    return f"{value:g} s"


class _Child:
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
        return _describe_exit(self.returncode)

    def snapshot(self) -> Instance:
        return Instance(
            self.pid, self.source, self.started_at, self.ready_at, self.restarts, self.returncode, self.status
        )


class _NotReady(Exception):
    """Internal: why an instance did not make it (without the version in front)."""


# --- the supervisor ------------------------------------------------------------------------


class Supervisor:
    """Owns the app's sockets and processes. Use as ``async with Supervisor(...) as sup:``;
    leaving the block stops the app (SIGTERM → drain_timeout → SIGKILL) and closes the sockets.
    """

    def __init__(
        self,
        config: AppConfig,
        *,
        marker: str,
        on_event: Callable[[str], None] | None = None,
        steer: bool = True,
        on_crash_loop: CrashLoopHandler | None = None,
    ) -> None:
        """``steer=False`` keeps every socket on the shared path (see :mod:`sshfwup.supervisor.listeners`).
        ``on_crash_loop``: see :meth:`_restart_after_crash` and ``[app] rollback_after_crashes``."""
        if not marker or "\0" in marker:
            raise ValueError("marker must be a non-empty string without NUL")
        self._config = config
        self._steer_sockets = steer
        self._marker = marker
        self._on_event = on_event
        self._on_crash_loop = on_crash_loop
        self._listeners: tuple[Listener, ...] = ()
        self._current: _Child | None = None
        self._children: set[_Child] = set()
        self._lock = anyio.Lock()  # start, swap, stop and crash restarts never interleave
        self._task_group: anyio.abc.TaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._closing = False
        self._spawned = 0
        self._token = secrets.token_hex(4)  # instance ids stay unique across supervisors
        self._last_exit: AppExit | None = None
        self._outage: Outage | None = None
        # The stand-in (sshfwup.supervisor.unavailable): woken whenever the outage or the lock changes;
        # its cancel scope and done event while it accepts on the public sockets.
        self._stand_in_wake: anyio.Event | None = None  # made in __aenter__ (needs the event loop)
        self._stand_in_scope: anyio.CancelScope | None = None
        self._stand_in_done: anyio.Event | None = None
        self._stand_in_answering = 0

    # --- context -------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        stack = AsyncExitStack()
        try:
            await anyio.to_thread.run_sync(kill_strays, self._marker)
            self._listeners = bind_listeners(self._config.sockets, steer=self._steer_sockets)
            stack.callback(listeners.close_listeners, self._listeners)
            self._task_group = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            await stack.aclose()
            raise
        self._exit_stack = stack
        self._closing = False
        for listener in self._listeners:
            log.info("listening on %s (%s; socket path %s)", listener.address, listener.name, listener.path)
        self._stand_in_wake = anyio.Event()
        if self._listeners:
            self._task_group.start_soon(self._stand_in)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._exit_stack is not None and self._task_group is not None
        stack, self._exit_stack = self._exit_stack, None
        self._closing = True
        try:
            with anyio.CancelScope(shield=True):
                await self.stop()
        finally:
            self._task_group.cancel_scope.cancel()  # crash-restart loops waiting out a backoff
            try:
                await stack.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                # The body runs inside our task group, and anyio groups the body's own exception
                # (our tasks raise none): hand the caller back the exception it raised.
                if exc is None or _sole_exception(group) is not exc:
                    raise
        return None

    # --- public API ----------------------------------------------------------------------

    @property
    def current(self) -> Instance | None:
        """The app process (running, starting, or crashed and waiting for its restart)."""
        return self._current.snapshot() if self._current else None

    @property
    def sockets(self) -> tuple[Listener, ...]:
        return self._listeners

    @property
    def last_exit(self) -> AppExit | None:
        """The last instance that ended unasked (crash, failed start, failed new version)."""
        return self._last_exit

    @property
    def outage(self) -> Outage | None:
        """Why no version runs now (from the first failure until an instance is ready again;
        None once one is, and after :meth:`stop`)."""
        return self._outage

    async def start(self, source: AppSource) -> Instance:
        """Start the app from ``source`` and wait until it is ready; keep it running afterwards.

        Raises :class:`AppNotReady` (and leaves nothing running) if it is not ready in time.
        """
        self._check_open()
        async with self._exclusive():
            if self._current is not None and self._current.returncode is None:
                raise SupervisorError(
                    f"the application already runs ({self._current.version}, pid {self._current.pid})"
                )
            child: _Child | None = None
            try:
                child = await self._launch(source, sockets=self._serving_sockets(), restarts=0, failures=0)
                await self._wait_ready(child)
            except _NotReady as e:
                if self._current is None or self._current.returncode is not None:
                    self._mark_down(f"{source.version} {e}")
                raise AppNotReady(f"{source.version} {e}", pid=child.pid if child else None) from None
            self._current = child
            child.supervised = True
            self._emit(f"{source.version} from slot {source.slot} is ready (pid {child.pid})")
            return child.snapshot()

    async def swap(self, source: AppSource, *, report: Report | None = None) -> SwapResult:
        """Replace the running version with the one in ``source``; see the module docstring.

        ``report`` receives one line per stage ("new version 2.0.0 ready in 0.31 s") for the
        uploader. Raises :class:`SwapFailed` after rolling back.
        """
        self._check_open()
        config = self._config

        async def say(line: str) -> None:
            await self._report(report, line)

        async with self._exclusive():
            old = self._current
            if old is None:
                raise SupervisorError("no application is running: start it before swapping")
            old.supervised = False  # from here on, an exit of the old version is the swap's business
            began = time.monotonic()
            new: _Child | None = None
            old_stopped = False
            drain = ready = handover = 0.0
            path = self._socket_path()
            try:
                await say(
                    f"swapping {old.version} (pid {old.pid}) for {source.version}"
                    f" from slot {source.slot} ({config.strategy}); socket path {path}"
                )
                sockets = self._fresh_sockets()
                if config.strategy == "stop-first":
                    handover = await self._hand_over(old, sockets, say, taker=f"wait for {source.version}")
                    drain = await self._drain(old, say)
                    old_stopped = True
                    self._release_unused()
                launched = time.monotonic()
                donor = old if config.strategy == "overlap" else None
                new = await self._launch(source, sockets=sockets, restarts=0, failures=0, donor=donor)
                transfer = await self._wait_ready_taking_over(new, donor)
                ready = time.monotonic() - launched
                if transfer is not None:  # first: the old version waits for its verdict, paused
                    await self._settle_handoff(old, transfer, say)
                await say(f"new version {source.version} ready in {ready:.2f} s (pid {new.pid})")
                self._current = new
                if config.strategy == "overlap":
                    proved = self._public_checks(new)  # at readiness; not those shared with the old version
                    handover = await self._hand_over(old, sockets, say, taker=f"go to {source.version}", new=new)
                    drain = await self._drain(old, say)
                    old_stopped = True
                    self._release_unused()
                    await self._prove_after_drain(new, proved, old, say)
                if config.observe > 0:
                    await say(f"watching {source.version} for {_seconds(config.observe)}")
                    problem = await self._watch(new, config.observe)
                    if problem:
                        raise _NotReady(f"{problem} during the observation window")
            except _NotReady as e:
                with anyio.CancelScope(shield=True):  # a rollback is never left half-done
                    failure = await self._roll_back(old, new, f"{source.version} {e}", say)
                raise failure from None
            except BaseException:
                # Cancelled (or a bug): leave one version serving — the new one only if it was
                # ready and the old one is gone already.
                with anyio.CancelScope(shield=True):
                    if new is not None and (not old_stopped or new.ready_at is None):
                        await self._abandon(new, old)
                        new = None
                    if new is None:
                        await self._restore(old)
                    else:
                        new.supervised = True
                    self._release_unused()
                raise
            new.supervised = True
            total = time.monotonic() - began
            await say(f"swap complete: {source.version} serves (pid {new.pid}); {total:.2f} s in all")
            return SwapResult(
                strategy=config.strategy,
                old_version=old.version,
                new_version=source.version,
                old_pid=old.pid,
                new_pid=new.pid,
                ready_seconds=ready,
                drain_seconds=drain,
                observe_seconds=config.observe,
                total_seconds=total,
                old_returncode=old.returncode,
                ready_at=new.ready_at or 0.0,
                socket_path=path,
                handover_seconds=handover,
                handoff=new.taken.verdict() if new.taken else "",
            )

    async def wait_healthy(self, duration: float) -> bool:
        """True if the current instance stays alive (and passes its probes) for ``duration``."""
        return await self.watch_health(duration) is None

    async def watch_health(self, duration: float) -> str | None:
        """Watch the current instance for ``duration`` as a swap's observation window does: None
        if it stayed alive and passed every round of checks, else what went wrong."""
        self._check_open()
        child = self._current
        problem = self._not_serving(child)
        if problem is not None or child is None:
            return problem
        problem = await self._watch(child, duration)
        return f"{child.version} {problem}" if problem else None

    async def check_health(self) -> str | None:
        """One round of checks on the current instance, now (what boot validation asks right
        before it validates): None if it runs, is ready and passes them, else what is wrong."""
        self._check_open()
        child = self._current
        problem = self._not_serving(child)
        if problem is not None or child is None:
            return problem
        problem = await self._health_verdict(child, rounds=self._config.health_failures)
        if problem is None and child.exited.is_set():
            problem = child.describe_exit()
        return f"{child.version} {problem}" if problem else None

    @staticmethod
    def _not_serving(child: _Child | None) -> str | None:
        if child is None:
            return "the app is not running"
        if child.process.returncode is not None or child.exited.is_set():
            return f"{child.version} {_describe_exit(child.process.returncode)}"
        if child.ready_at is None:
            return f"{child.version} is not ready (pid {child.pid})"
        return None

    async def stop(self) -> None:
        """Stop the app (SIGTERM → drain_timeout → SIGKILL). The sockets stay bound; nothing
        answers on them until the next start (connections wait in the queue)."""
        async with self._exclusive():
            self._outage = None  # stopped on purpose: not an outage to answer for
            current, self._current = self._current, None
            for child in sorted(self._children, key=lambda c: c is not current):
                await self._stop_child(child)
            self._release_unused()
            if current is not None:
                self._emit(f"{current.version} stopped ({current.describe_exit()})")

    # --- instances -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._task_group is None or self._exit_stack is None:
            raise SupervisorError("the supervisor is not running (use it as 'async with Supervisor(...)')")
        if not self._config.command:
            raise SupervisorError("[app] command is empty: there is no application to run")

    async def _launch(
        self, source: AppSource, *, sockets: tuple[socket.socket, ...], restarts: int, failures: int,
        donor: _Child | None = None,
    ) -> _Child:
        """Start one instance with ``sockets`` (one per listener) at fds 3.. (raises _NotReady)."""
        assert self._task_group is not None
        config = self._config
        source = AppSource(source.root.absolute(), source.slot, source.version)  # cwd moves
        app_dir = source.app_dir(config.app_dir)
        if not app_dir.is_dir():
            raise _NotReady(f"could not be started: the application directory {app_dir} does not exist")
        self._spawned += 1
        instance_id = f"{self._marker}/{os.getpid()}.{self._token}/{self._spawned}"
        try:
            app_room = room.prepare_room(config, instance_id)
        except room.RoomError as e:
            raise _NotReady(f"could not be started: {e}") from None
        notify, notify_address = listeners.open_notify_socket()
        health = listeners.open_health_socket() if config.ready in ("http", "tcp") else None
        passed = [*sockets, *([health] if health else [])]
        names = [listener.name for listener in self._listeners] + ([HEALTH_SOCKET_NAME] if health else [])
        fds = [sock.fileno() for sock in passed]
        env = self._environment(source, app_dir, instance_id, notify_address, names, app_room)
        channel = self._handoff_channel(fds, env)
        command = [_substitute(arg, source.root, app_dir) for arg in config.command]
        # The shim moves the fds to 3.., sets LISTEN_PID to its own pid and PR_SET_PDEATHSIG,
        # then execs the command: pass_fds alone keeps the parent's fd numbers.
        argv = [sys.executable, "-I", "-S", str(_EXEC_SHIM), "--sshfwup-exec", str(os.getpid()),
                ",".join(map(str, fds)), *app_room.shim_options(), "--", *command]  # fmt: skip
        try:
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=app_dir, env=env,
                pass_fds=fds, start_new_session=True,  # fmt: skip
            )
        except OSError as e:
            notify.close()
            if health:
                health.close()
            if channel:
                channel.close()
            raise _NotReady(f"could not be started: {e.strerror or e}") from e
        child = _Child(process, source, instance_id=instance_id, sockets=sockets, notify=notify, health=health,
                       restarts=restarts, failures=failures)  # fmt: skip
        if channel is not None:
            channel.spawned()
            child.handoff = channel
            if donor is None:
                channel.tell(b"NONE", "nothing to hand over: a plain start")
        child.cgroup = app_room.cgroup
        self._children.add(child)
        await self._task_group.start(self._run_child, child)
        log.info("started %s from slot %s: pid %d", source.version, source.slot, child.pid)
        return child

    def _environment(
        self, source: AppSource, app_dir: Path, instance_id: str, notify_address: str, names: list[str],
        app_room: room.Room,
    ) -> dict[str, str]:
        env = {k: v for k, v in app_room.environment(os.environ).items() if k not in _INHERITED_PROTOCOL_VARIABLES}
        env.update((key, _substitute(value, source.root, app_dir)) for key, value in self._config.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir), env.get("PYTHONPATH", "")]))
        env.update(
            SSHFWUP_SLOT=source.slot,
            SSHFWUP_VERSION=source.version,
            SSHFWUP_APP_ROOT=str(source.root),
            SSHFWUP_APP_DIR=str(app_dir),
            NOTIFY_SOCKET=notify_address,
        )
        env[MARKER_VARIABLE] = self._marker
        env[INSTANCE_VARIABLE] = instance_id
        if names:
            env["LISTEN_FDS"] = str(len(names))
            env["LISTEN_FDNAMES"] = ":".join(names)
        return env

    async def _run_child(
        self, child: _Child, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Owns the process until it exits: reads its notifications, reaps it, cleans up."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._read_notifications, child)
                output_done = anyio.Event()
                tasks.start_soon(_log_output, child, output_done)
                task_status.started()
                await child.process.wait()
                with anyio.move_on_after(_OUTPUT_DRAIN):  # its last lines, e.g. "drained; exiting"
                    await output_done.wait()
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if child.process.returncode is None:  # cancelled while it runs: never leave it behind
                    _kill_group(child)
                    with anyio.move_on_after(_KILL_WAIT):
                        await child.process.wait()
                if child.process.stdout is not None:
                    await child.process.stdout.aclose()
            child.returncode = child.process.returncode
            _receive_notifications(child)  # a last STATUS= sent right before exiting
            child.notify.close()
            if child.health is not None:
                child.health.close()
            if child.handoff is not None:
                child.handoff.close()
            await self._end_leftovers(child)
            caught = room.release_cgroup(child.cgroup)  # what it started, however detached
            if caught:
                log.warning("killed %s left in the cgroup of %s (pid %d)", caught, child.version, child.pid)
            self._children.discard(child)
            child.exited.set()
        if not child.stopping or child.failure is not None:
            self._record_exit(child)
        self._on_exit(child)

    async def _end_leftovers(self, child: _Child) -> None:
        """Wait for the processes ``child`` left behind: SIGTERM (nobody else will tell them), the
        rest of its drain time to exit on their own, then SIGKILL. Logged once: routine when they
        exit by themselves (a multiprocessing resource tracker does), a warning when killed."""
        entry = f"{INSTANCE_VARIABLE}={child.instance_id}"
        if not procs.processes_with(entry):
            return
        ended_at = time.monotonic()
        deadline = child.drain_deadline if child.drain_deadline is not None else ended_at + self._config.drain_timeout
        grace = max(0.0, deadline - ended_at)
        sweep = await anyio.to_thread.run_sync(
            functools.partial(procs.end_processes_with, entry, grace=grace, timeout=_KILL_WAIT)
        )
        seconds = time.monotonic() - ended_at
        left = list(sweep.signalled)
        if not left and not sweep.survivors:
            return  # gone between the two looks
        if sweep.survivors:
            log.error("%s (pid %d) left %s; %s survived SIGKILL", child.version, child.pid, left, list(sweep.survivors))
        elif sweep.killed:
            log.warning("%s (pid %d) left %s; killed %s, still running %.1f s after it",
                        child.version, child.pid, left, list(sweep.killed), seconds)  # fmt: skip
        else:
            log.debug("%s (pid %d) left %s; they exited within %.2f s", child.version, child.pid, left, seconds)

    async def _read_notifications(self, child: _Child) -> None:
        while True:
            await anyio.wait_readable(child.notify)
            _receive_notifications(child)

    async def _wait_ready(self, child: _Child) -> None:
        """Return once ``child`` is ready — it said so (or passed its probe), and accepted a probe
        connection on each of its public sockets; raise _NotReady if it exits or time runs out."""
        config = self._config
        outcome: list[str | None] = []  # the first finisher decides
        last_probe = [""]
        unproven: list[tuple[Listener, float]] = []  # the public socket it has yet to accept on

        async def exits() -> None:
            await child.exited.wait()
            # The STATUS= of an instance that never got ready tells why (the exec shim sends one)
            status = f" ({child.status})" if child.status else ""
            outcome.append(f"{child.describe_exit()} before it became ready{status}")
            tasks.cancel_scope.cancel()

        async def becomes_ready() -> None:
            if config.ready == "notify":
                await child.ready.wait()
            else:
                while (problem := await self._probe(child, timeout=None)) is not None:
                    last_probe[0] = problem
                    await anyio.sleep(_PROBE_RETRY)
            said_ready = time.monotonic() - child.started_at
            # READY=1 or a private probe proves nothing about the sockets clients connect to.
            for listener, sock in self._public_checks(child):
                unproven[:] = [(listener, said_ready)]
                problem = await self._accept_probe(listener, sock, timeout=None)
                if problem is not None:
                    outcome.append(problem)
                    tasks.cancel_scope.cancel()
                    return
            unproven.clear()
            outcome.append(None)
            tasks.cancel_scope.cancel()

        with anyio.move_on_after(config.ready_timeout):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(exits)
                tasks.start_soon(becomes_ready)
        if not outcome:
            if unproven:
                listener, said_ready = unproven[0]
                announced = "said READY=1" if config.ready == "notify" else "passed its readiness probe"
                hint = (
                    f": it {announced} after {said_ready:.2f} s, but accepted no connection on its public socket"
                    f" {listener.name} ({listener.address}) — an app must serve the sockets it is given"
                    " (LISTEN_FDS), not listen on its own"
                )
            elif last_probe[0]:
                hint = f" (last probe: {last_probe[0]})"
            else:
                hint = self._silence(child)
            child.failure = f"{child.version} did not become ready within {_seconds(config.ready_timeout)}{hint}"
            await self._stop_child(child)
            raise _NotReady(f"did not become ready within {_seconds(config.ready_timeout)}{hint}")
        if outcome[0] is not None:
            child.failure = f"{child.version} {outcome[0]}"
            await self._stop_child(child)
            raise _NotReady(outcome[0])
        child.ready_at = time.monotonic()
        self._outage = None  # a version serves again (the stand-in was stood down before its start)

    async def _probe(self, child: _Child, *, timeout: float | None) -> str | None:
        """One readiness/health probe on the instance's private socket: None if it passed."""
        assert child.health is not None
        port = child.health.getsockname()[1]
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            try:
                if self._config.ready == "http":
                    steered = self._probe_target(child)
                    if steered is None:
                        return await listeners.http_probe(port, self._config.ready_path)
                    listener, sock = steered
                    with listener.probe_route(sock) as route:
                        return await listeners.http_probe(port, self._config.ready_path, route=route)
                return await listeners.tcp_probe(child.health, port)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return "connection closed without a response"
            except (OSError, listeners.ListenerError) as e:
                return f"connection failed: {getattr(e, 'strerror', None) or e}"
        return f"no answer within {_seconds(timeout or 0)}"

    def _silence(self, child: _Child) -> str:
        """Why a readiness probe that never returned got nowhere, for the failure's reason."""
        if self._config.ready == "tcp":
            return " (its private health socket accepted no connection)"
        if self._config.ready == "http":
            steered = self._probe_target(child)
            where = (f"its public socket {steered[0].name} ({steered[0].address})" if steered
                     else "its private health socket")  # fmt: skip
            return f" (no answer to GET {self._config.ready_path} through {where})"
        return ""

    def _public_checks(self, child: _Child) -> list[tuple[Listener, socket.socket]]:
        """``child``'s public sockets where a probe connection can only be accepted by ``child``:
        TCP sockets no other running instance holds — its own on a steered listener; a shared one
        while it is the only instance (during an overlap on the shared path the old version could
        accept the probe: there the proof waits until the old one drained). Not the listener an http probe already goes through (its answer proves more),
        nor UNIX sockets (no accept queue to watch)."""
        http_target = self._probe_target(child) if self._config.ready == "http" else None
        others = [c for c in self._children if c is not child and c.process.returncode is None]
        return [
            (listener, sock)
            for listener, sock in zip(self._listeners, child.sockets)
            if listener.spec.kind == "tcp"
            and (http_target is None or listener is not http_target[0])
            and not any(sock in other.sockets for other in others)
        ]

    async def _accept_probe(
        self, listener: Listener, sock: socket.socket, *, timeout: float | None, stall: bool = False
    ) -> str | None:
        """A probe connection to ``sock`` (see listeners.accept_probe): None once it was accepted.
        ``stall``: a health check — the probe may wait behind busy workers as long as the queue
        moves; ``[app] stall_timeout`` without any accept there means the app stopped accepting."""
        what = f"its public socket {listener.name} ({listener.address})"
        stall_timeout = self._config.stall_timeout if stall else None
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            try:
                with listener.probe_connection(sock) as route:
                    await listeners.accept_probe(sock, route, stall_timeout=stall_timeout)
                return None
            except listeners.AcceptStalled as e:
                return f"stopped accepting connections on {what}: {e}"
            except (OSError, listeners.ListenerError) as e:
                return f"could not be probed on {what}: {getattr(e, 'strerror', None) or e}"
        return f"stopped accepting connections on {what}: a probe connection waited {_seconds(timeout or 0)} unaccepted"

    async def _health_problem(self, child: _Child) -> tuple[str | None, bool]:
        """One round of health checks: the http/tcp probe, and a probe connection accepted on each
        public socket (every readiness mode). Returns (None, _) if all passed, else (what failed,
        whether it is a failed answer of the health check — which counts only after
        ``[app] health_failures`` in a row — rather than no progress at all, which counts at once).

        Saturated is not dead (issue #20): a probe that waits behind busy workers passes once it
        is accepted or answered; only ``stall_timeout`` without any progress fails it."""
        config = self._config
        if child.health is not None:
            began = time.monotonic()
            problem = await self._probe(child, timeout=config.stall_timeout)
            if problem is not None:
                silent = problem.startswith("no answer within")
                what = "stopped answering its health check" if silent else "failed its health check"
                return f"{what} ({problem})", not silent
            _passed(child, f"{config.ready} check", began)
        for listener, sock in self._public_checks(child):
            began = time.monotonic()
            problem = await self._accept_probe(listener, sock, timeout=self._busy_limit(), stall=True)
            if problem is not None:
                return problem, False
            _passed(child, f"probe connection on {listener.name}", began)
        return None, False

    async def _health_verdict(self, child: _Child, *, rounds: int) -> str | None:
        """Up to ``rounds`` rounds of checks, ``health_interval`` apart, while only failed answers
        of the health check come back: None once a round passes, else the last problem."""
        for number in range(1, rounds + 1):
            problem, repeatable = await self._health_problem(child)
            if problem is None or not repeatable or number == rounds:
                return problem
            log.warning("%s (pid %d) %s; checking again (%d of %d failures allowed in a row)",
                        child.version, child.pid, problem, number, self._config.health_failures)  # fmt: skip
            await anyio.sleep(self._config.health_interval)
        return None

    def _busy_limit(self) -> float:
        """The longest a health check's probe connection may wait while its queue still moves (a
        bound for the case the kernel's accept count cannot be read exactly)."""
        return max(self._config.ready_timeout, self._config.stall_timeout)

    async def _prove_after_drain(
        self, new: _Child, proved: list[tuple[Listener, socket.socket]], old: _Child,
        say: Callable[[str], Awaitable[None]],
    ) -> None:
        """The shared path: a public socket the old version accepted from too can be proved only
        once it drained (raises _NotReady; the old version is then started again)."""
        for listener, sock in self._public_checks(new):
            if (listener, sock) in proved:
                continue
            problem = await self._accept_probe(listener, sock, timeout=self._busy_limit(), stall=True)
            if problem is not None:
                raise _NotReady(f"{problem} once {old.version} had drained")
            await say(f"{new.version} accepts on {listener.name} ({listener.address}), which {old.version} shared")

    async def _watch(self, child: _Child, duration: float) -> str | None:
        """Watch ``child`` for ``duration``: None if it stayed alive and healthy, else what failed.

        A round of checks every ``health_interval``, the last one at the end of the window; a
        round is not cut short by the window's end (a probe that hangs then counts), so the watch
        may last up to ``stall_timeout`` longer. A failed answer of the health check fails the
        watch after ``health_failures`` rounds in a row; no progress (see :meth:`_health_problem`)
        and an exit fail it at once."""
        interval = max(self._config.health_interval, 0.05)
        deadline = anyio.current_time() + duration
        outcome: list[str] = []
        failures = [0]

        async def exits() -> None:
            await child.exited.wait()
            outcome.append(child.describe_exit())
            tasks.cancel_scope.cancel()

        async def stays_healthy() -> None:
            while True:
                # Failures in a row are seen through to a verdict, even past the window's end
                await anyio.sleep(interval if failures[0] else min(interval, max(0.0, deadline - anyio.current_time())))
                problem, repeatable = await self._health_problem(child)
                failures[0] = failures[0] + 1 if problem is not None and repeatable else 0
                if problem is not None and (not repeatable or failures[0] >= self._config.health_failures):
                    outcome.append(problem)
                    break
                if problem is not None:
                    log.warning("%s (pid %d) %s (%d of %d failures allowed in a row)",
                                child.version, child.pid, problem, failures[0], self._config.health_failures)  # fmt: skip
                if anyio.current_time() >= deadline and not failures[0]:
                    break
            tasks.cancel_scope.cancel()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(exits)
            tasks.start_soon(stays_healthy)
        return outcome[0] if outcome else None

    async def _stop_child(self, child: _Child) -> tuple[float, bool]:
        """SIGTERM, wait up to drain_timeout, then SIGKILL the process group.

        Returns (seconds until it exited, whether it had to be killed). Not cancellable: a
        half-stopped instance is worse than a late one.
        """
        child.supervised = False
        child.stopping = True
        began = time.monotonic()
        if child.drain_deadline is None:
            child.drain_deadline = began + self._config.drain_timeout
        killed = False
        with anyio.CancelScope(shield=True):
            if not child.exited.is_set():
                try:
                    child.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                with anyio.move_on_after(max(0.0, child.drain_deadline - began)):
                    await child.exited.wait()
            if not child.exited.is_set():
                if child.process.returncode is None:
                    killed = True
                    _kill_group(child)
                # else only processes it left behind remain: _end_leftovers kills them now
                with anyio.move_on_after(2 * _KILL_WAIT):
                    await child.exited.wait()
                if not child.exited.is_set():
                    log.error("%s (pid %d) survived SIGKILL for %g s", child.version, child.pid, _KILL_WAIT)
        return time.monotonic() - began, killed

    async def _drain(self, old: _Child, say: Callable[[str], Awaitable[None]]) -> float:
        if old.exited.is_set():
            await say(f"old version {old.version} had already stopped ({old.describe_exit()})")
            return 0.0
        seconds, killed = await self._stop_child(old)
        if killed:
            await say(
                f"old version {old.version} did not stop within {_seconds(self._config.drain_timeout)}"
                " of SIGTERM: killed"
            )
        else:
            await say(f"old version {old.version} drained in {seconds:.2f} s")
        return seconds

    # --- sockets across versions ---------------------------------------------------------

    def _serving_sockets(self) -> tuple[socket.socket, ...]:
        """The sockets that receive new connections now: what the current version (re)starts on."""
        return tuple(listener.sock for listener in self._listeners)

    def _fresh_sockets(self) -> tuple[socket.socket, ...]:
        """Sockets for a new version: its own on a steered listener, the shared one otherwise."""
        created: list[tuple[Listener, socket.socket]] = []
        try:
            for listener in self._listeners:
                created.append((listener, listener.instance_socket()))
        except listeners.ListenerError as e:
            for listener, sock in created:
                listener.release(sock)
            raise _NotReady(f"could not be started: {e}") from e
        return tuple(sock for _, sock in created)

    def _steer(self, sockets: tuple[socket.socket, ...]) -> None:
        """Steer back (rollback): a failure is logged, the rollback goes on."""
        for listener, sock in zip(self._listeners, sockets, strict=True):
            try:
                listener.steer_to(sock)
            except listeners.ListenerError as e:
                log.error("%s", e)

    def _socket_path(self) -> str:
        paths = [listener.path for listener in self._listeners]
        if not paths:
            return "none"
        if len(set(paths)) == 1:
            return paths[0]
        return ", ".join(f"{listener.name}={path}" for listener, path in zip(self._listeners, paths))

    def _probe_target(self, child: _Child) -> tuple[Listener, socket.socket] | None:
        """The first steered listener and ``child``'s socket there: where http probes go."""
        for listener, sock in zip(self._listeners, child.sockets):
            if listener.steered and sock in listener.members:
                return listener, sock
        return None

    async def _hand_over(
        self,
        old: _Child,
        sockets: tuple[socket.socket, ...],
        say: Callable[[str], Awaitable[None]],
        *,
        taker: str,
        new: _Child | None = None,
    ) -> float:
        """Steer new connections to ``sockets``; return once ``old`` has accepted everything that
        was queued for it and its queues stayed empty for ``_HANDOVER_QUIET`` (it keeps serving
        meanwhile). Raises _NotReady if ``new`` exits meanwhile. Returns the seconds it took."""
        moves = [(listener, mine, theirs)
                 for listener, mine, theirs in zip(self._listeners, old.sockets, sockets, strict=True)
                 if mine is not theirs]  # fmt: skip
        if not moves:
            return 0.0  # shared path: both versions accept from one queue until the old one drains
        began = time.monotonic()
        try:
            for listener, _, theirs in moves:
                listener.steer_to(theirs)
        except listeners.ListenerError as e:
            raise _NotReady(f"could not take over new connections: {e}") from e
        await say(f"new connections {taker} now ({self._socket_path()})")
        quiet_since: float | None = None
        while not old.exited.is_set():
            now = time.monotonic()
            if new is not None and new.exited.is_set():
                raise _NotReady(f"{new.describe_exit()} while taking over new connections")
            if any(listener.queued(mine) for listener, mine, _ in moves):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= _HANDOVER_QUIET:
                break
            if now - began >= _HANDOVER_LIMIT:
                log.warning("%s (pid %d) still had connections queued %g s after the hand-over",
                            old.version, old.pid, _HANDOVER_LIMIT)  # fmt: skip
                break
            await anyio.sleep(_HANDOVER_POLL)
        seconds = time.monotonic() - began
        await say(f"{old.version} took the last connection queued for it; {seconds:.2f} s after the hand-over")
        return seconds

    def _release_unused(self) -> None:
        """Release every socket that receives no new connections and no instance holds any more."""
        held = {id(sock) for child in self._children for sock in child.sockets}
        for listener in self._listeners:
            for sock in listener.members:
                if sock is not listener.sock and id(sock) not in held:
                    try:
                        listener.release(sock)
                    except listeners.ListenerError as e:  # released all the same; steering not updated
                        log.error("%s", e)

    # --- state and connection hand-off ([app] handoff; sshfwup.app.handoff) ---------------------

    def _handoff_channel(self, fds: list[int], env: dict[str, str]) -> handoff_relay.Channel | None:
        """A hand-off channel for a new instance: passed after the listening sockets (fd 3 +
        len(fds), not counted in LISTEN_FDS) and named in SSHFWUP_HANDOFF_FD. None when off."""
        config = self._config
        if not config.handoff:
            return None
        from sshfwup.app import handoff
        from . import handoff_relay

        channel = handoff_relay.Channel()
        env[handoff.ENV_FD] = str(app_protocol.LISTEN_FDS_START + len(fds))
        env[handoff.ENV_TIMEOUT] = f"{config.handoff_timeout:g}"
        # A sender waits for DONE/KEEP until the receiver is ready (or given up on)
        env[handoff.ENV_VERDICT_TIMEOUT] = f"{config.ready_timeout + 2 * config.handoff_timeout + 5:g}"
        fds.append(channel.passed_fd())
        return channel

    async def _wait_ready_taking_over(self, new: _Child, donor: _Child | None) -> handoff_relay.Transfer | None:
        """:meth:`_wait_ready`, and meanwhile, once ``new`` asks (WANT), relay ``donor``'s state
        and connections to it. None without hand-off, else how it went (kept as ``new.taken``);
        the caller settles with the donor (:meth:`_settle_handoff`). Raises _NotReady."""
        if new.handoff is None or donor is None:
            await self._wait_ready(new)
            return None
        from . import handoff_relay

        config = self._config
        limits = handoff_relay.Limits(config.handoff_max_state, config.handoff_max_sockets, config.handoff_timeout)
        channel = new.handoff
        outcome: list[handoff_relay.Transfer] = []
        failure: list[_NotReady] = []
        asked, done = anyio.Event(), anyio.Event()

        def nothing(problem: str) -> handoff_relay.Transfer:
            return handoff_relay.Transfer(False, donor.version, new.version, problem=problem)

        async def take() -> None:
            try:
                if not await handoff_relay.wait_want(channel):
                    return
                asked.set()
                if donor.handoff is None or donor.handoff.broken or donor.exited.is_set() or donor.stopping:
                    stopped = donor.exited.is_set() or donor.stopping
                    what = "has stopped" if stopped else "has no usable hand-off channel"
                    channel.tell(b"NONE", f"{donor.version} {what}")
                    outcome.append(nothing(f"{donor.version} {what}; {new.version} starts clean"))
                    return
                donor.owes_verdict = True
                transfer = await handoff_relay.relay(
                    donor.handoff, channel, limits, sender_name=donor.version, receiver_name=new.version
                )
                donor.owes_verdict = transfer.taken  # else the relay told it KEEP already
                outcome.append(transfer)
            finally:
                done.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(take)
            try:
                await self._wait_ready(new)
            except _NotReady as e:
                failure.append(e)
            if not failure and asked.is_set():  # READY=1 may overtake the TAKE on its way
                with anyio.move_on_after(config.handoff_timeout):
                    await done.wait()
            tasks.cancel_scope.cancel()
        if failure:
            raise failure[0]
        if outcome:
            transfer = outcome[0]
        elif asked.is_set():
            transfer = nothing(f"{new.version} said it was ready before it took {donor.version}'s state")
        else:
            transfer = nothing(f"{new.version} became ready without asking for the hand-off")
        new.taken = transfer
        return transfer

    async def _settle_handoff(
        self, sender: _Child, transfer: handoff_relay.Transfer, say: Callable[[str], Awaitable[None]]
    ) -> None:
        """The receiver is ready: DONE to the sender (close your copies) if it took everything,
        else KEEP (everything is still yours); then say what moved."""
        if sender.owes_verdict and sender.handoff is not None:
            sender.handoff.tell(b"DONE" if transfer.taken else b"KEEP")
            sender.gave_away = transfer.taken
        sender.owes_verdict = False
        if transfer.taken:
            await say(
                f"{transfer.receiver} took over {transfer.summary()} from {transfer.sender}"
                f" (state version {transfer.state_version}) in {transfer.seconds:.3f} s"
            )
        else:
            await say(f"no hand-off: {transfer.problem}")

    def _can_hand_back(self, new: _Child, old: _Child) -> bool:
        """A failed new version can hand back what it holds: hand-off is on, it still runs and
        the old version no longer does (a running old version never gave anything away)."""
        return (
            new.handoff is not None
            and not new.handoff.broken
            and new.process.returncode is None
            and not new.exited.is_set()
            and (old.exited.is_set() or old.stopping or old.gave_away)
        )

    @staticmethod
    def _lost_handoff(failed: _Child | None, donor: _Child | None) -> str:
        """What a failed new version took with it when it cannot hand back (for the rollback line)."""
        if donor is not None or failed is None or failed.taken is None or not failed.taken.taken:
            return ""
        why = failed.describe_exit() if failed.exited.is_set() else "could not hand it back"
        return f"; lost what {failed.version} had taken over ({failed.taken.summary()}): it {why}"

    @staticmethod
    def _keep_handoff(sender: _Child) -> None:
        """A sender waiting for the verdict of a hand-off that did not happen: KEEP (it still
        owns its state and connections)."""
        if sender.owes_verdict:
            sender.owes_verdict = False
            if sender.handoff is not None:
                sender.handoff.tell(b"KEEP")

    async def _emit_async(self, line: str) -> None:
        self._emit(line)

    # --- failure handling ----------------------------------------------------------------

    async def _abandon(self, new: _Child, old: _Child) -> None:
        """Stop the new version; while the old one still runs, it receives new connections first."""
        if not old.exited.is_set() and not old.stopping:
            self._steer(old.sockets)
        await self._stop_child(new)

    async def _roll_back(
        self, old: _Child, new: _Child | None, reason: str, say: Callable[[str], Awaitable[None]]
    ) -> SwapFailed:
        """Stop the new version, bring the old one back; the SwapFailed that tells the caller."""
        await say(reason)
        if new is not None and new.failure is None:
            new.failure = reason
        # With hand-off, a new version still running once the old one is gone hands back.
        donor = new if new is not None and self._can_hand_back(new, old) else None
        self._keep_handoff(old)  # before stopping the new version: the old one waits, frozen
        if new is not None and donor is None:
            await self._abandon(new, old)
        restored, rollback = await self._restore(old, donor=donor, failed=new, say=say)
        if donor is not None:
            self._keep_handoff(donor)  # it did not hand back: paused until told, it could not drain
            await self._stop_child(donor)
        self._release_unused()
        await say(rollback)
        return SwapFailed(
            reason,
            rollback=rollback,
            new_pid=new.pid if new else None,
            restored=restored.snapshot() if restored else None,
        )

    async def _restore(
        self, old: _Child, *, donor: _Child | None = None, failed: _Child | None = None,
        say: Callable[[str], Awaitable[None]] | None = None,
    ) -> tuple[_Child | None, str]:
        """Make the old version serve again: it still does (new connections go to it again), or
        start it again from its source on the sockets that receive new connections now — taking
        the state and connections back from ``donor`` (the failed new version, still running)."""
        self._keep_handoff(old)
        if old.gave_away and not old.exited.is_set():
            await self._stop_child(old)  # it runs on without its state: start it again instead
        if not old.exited.is_set() and not old.stopping:
            self._steer(old.sockets)
            old.supervised = True
            self._current = old
            return old, f"{old.version} is still serving (pid {old.pid})"
        lost = self._lost_handoff(failed, donor)
        failed = old
        try:
            child = await self._launch(
                old.source, sockets=self._serving_sockets(), restarts=old.restarts, failures=0, donor=donor
            )
            self._current = failed = child
            transfer = await self._wait_ready_taking_over(child, donor)
            if transfer is not None and donor is not None:
                await self._settle_handoff(donor, transfer, say or self._emit_async)
                lost = (f"; handed back {transfer.summary()}" if transfer.taken else
                        f"; {transfer.summary()}: the state and connections of {donor.version} are lost")  # fmt: skip
        except _NotReady as e:
            self._current = failed
            self._mark_down(f"{old.version} could not be started again ({e})")
            assert self._task_group is not None
            self._task_group.start_soon(self._restart_after_crash, failed, 1)
            return None, f"{old.version} could not be started again ({e}); retrying with backoff"
        child.supervised = True
        return child, f"{old.version} started again from slot {old.source.slot} (pid {child.pid}){lost}"

    def _on_exit(self, child: _Child) -> None:
        if self._closing or child.stopping or not child.supervised or child is not self._current:
            return  # stopped on purpose, or a start/swap in progress owns it
        self._mark_down(f"{child.version} {child.describe_exit()}")
        maximum = self._config.restart_backoff[1]
        ran = time.monotonic() - child.started_at
        failures = 1 if ran >= maximum else child.failures + 1
        assert self._task_group is not None
        self._task_group.start_soon(self._restart_after_crash, child, failures)

    async def _restart_after_crash(self, crashed: _Child, failures: int) -> None:
        """Start the app again after ``crashed`` exited, with backoff, until a start succeeds.

        ``failures`` counts the crashes (and failed starts) in a row. From
        ``rollback_after_crashes`` on, ``on_crash_loop`` is asked first: it may name another
        source to start instead (the daemon names the running root's firmware when the crashing
        version was hot-swapped in), which then starts at once.
        """
        first, maximum = self._config.restart_backoff
        source, restarts = crashed.source, crashed.restarts + 1
        while True:
            replacement = await self._crash_loop(crashed, source, failures)
            if replacement is not None:
                self._emit(
                    f"{source.version} failed {failures} times in a row; starting {replacement.version}"
                    f" from slot {replacement.slot} instead",
                    logging.ERROR,
                )
                source, restarts, failures = replacement, 0, 0
            else:
                delay = min(first * 2 ** (failures - 1), maximum)
                again = "restarting" if source is crashed.source else f"starting {source.version}"
                self._emit(
                    f"{crashed.version} (pid {crashed.pid}) {crashed.describe_exit()}; {again} in {_seconds(delay)}",
                    logging.WARNING,
                )
                self._next_attempt_in(delay)
                await anyio.sleep(delay)
            async with self._exclusive():
                if self._current is not crashed or self._closing:
                    return  # a swap, start or stop took over meanwhile
                child: _Child | None = None
                try:
                    child = await self._launch(
                        source, sockets=self._serving_sockets(), restarts=restarts, failures=failures
                    )
                    self._current = child
                    await self._wait_ready(child)
                except _NotReady as e:
                    self._emit(f"{source.version} {e}", logging.WARNING)
                    self._mark_down(f"{source.version} {e}")
                    crashed = child or crashed  # the failed attempt is the one to replace next
                    failures += 1
                    restarts += 1
                    continue
                child.supervised = True
                self._emit(f"{child.version} restarted (pid {child.pid}, restart {child.restarts})")
                return

    async def _crash_loop(self, crashed: _Child, source: AppSource, failures: int) -> AppSource | None:
        """What ``on_crash_loop`` says once ``failures`` reached the limit (None: keep restarting).
        Bounded; a callback that fails is logged and restarting goes on."""
        limit = self._config.rollback_after_crashes
        if self._on_crash_loop is None or limit <= 0 or failures < limit:
            return None
        instance = dataclasses.replace(crashed.snapshot(), source=source)
        try:
            with anyio.move_on_after(_CRASH_LOOP_TIMEOUT):
                return await self._on_crash_loop(instance, failures)
            log.error("the crash-loop handler did not finish within %s; restarting %s", _seconds(_CRASH_LOOP_TIMEOUT),
                      source.version)  # fmt: skip
        except Exception:
            log.exception("the crash-loop handler failed; restarting %s", source.version)
        return None

    # --- when no version runs: the last exit, the outage, the stand-in ---------------------

    def _record_exit(self, child: _Child) -> None:
        reason = child.failure or f"{child.version} {child.describe_exit()}"
        if child.ready_at is None and child.failure is None:
            reason += " before it became ready" + (f" ({child.status})" if child.status else "")
        self._last_exit = AppExit(
            version=child.version, slot=child.source.slot, pid=child.pid, returncode=child.returncode,
            at=time.time(), reason=reason, output=tuple(child.output),
        )  # fmt: skip

    def _mark_down(self, reason: str) -> None:
        """No version runs (after a crash or a failed start): remember why; the stand-in answers
        once ``unavailable_after`` passed since the outage began."""
        if self._closing:
            return
        since = self._outage.since if self._outage is not None else time.monotonic()
        self._outage = Outage(reason, since)
        self._wake_stand_in()

    def _next_attempt_in(self, delay: float) -> None:
        if self._outage is not None:
            self._outage = dataclasses.replace(self._outage, next_attempt=time.monotonic() + delay)

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """The supervisor's lock, for anything that starts, swaps or stops instances: the
        stand-in stops accepting first (an instance about to start owns the queue), and may
        answer again once the lock is free."""
        async with self._lock:
            await self._stand_down()
            try:
                yield
            finally:
                self._wake_stand_in()

    def _wake_stand_in(self) -> None:
        if self._stand_in_wake is not None:
            self._stand_in_wake.set()

    async def _stand_down(self) -> None:
        scope, done = self._stand_in_scope, self._stand_in_done
        if scope is None or done is None:
            return
        scope.cancel()
        with anyio.CancelScope(shield=True):
            await done.wait()  # it accepts nothing once this returns

    def _may_stand_in(self) -> bool:
        return (
            self._outage is not None
            and not self._closing
            and not self._lock.locked()
            and not any(child.process.returncode is None for child in self._children)
        )

    async def _stand_in(self) -> None:
        """Answer on the public sockets while no version runs (see the module doc)."""
        while True:
            wake = self._stand_in_wake = anyio.Event()
            outage = self._outage
            if not self._may_stand_in() or outage is None:
                await wake.wait()
                continue
            wait = outage.since + self._config.unavailable_after - time.monotonic()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await wake.wait()
                continue
            # No await between the check above and publishing the scope: _stand_down sees it.
            done = self._stand_in_done = anyio.Event()
            with anyio.CancelScope() as scope:
                self._stand_in_scope = scope
                log.info("no version of the app runs (%s): answering on its sockets meanwhile", outage.reason)
                try:
                    async with anyio.create_task_group() as tasks:
                        for listener in self._listeners:
                            tasks.start_soon(self._accept_standing_in, listener)
                finally:
                    self._stand_in_scope = None
                    done.set()

    async def _accept_standing_in(self, listener: Listener) -> None:
        sock = listener.sock
        http = listener.name in self._config.http_sockets
        assert self._task_group is not None
        while True:
            try:
                await anyio.wait_readable(sock)
            except (OSError, anyio.ClosedResourceError) as e:  # never takes the supervisor down
                log.error("%s: cannot wait for connections while the app is down: %s", listener.name, e)
                return
            if self._stand_in_scope is None or self._stand_in_scope.cancel_called or not self._may_stand_in():
                return  # an instance is about to start: the queue is its own
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # out of fds: the connection stays queued, try again shortly
                log.warning("%s: cannot accept while the app is down: %s", listener.name, e.strerror or e)
                await anyio.sleep(0.1)
                continue
            if not http or self._stand_in_answering >= _STAND_IN_CONNECTIONS:
                unavailable.close_at_once(conn)
                continue
            outage = self._outage
            assert outage is not None
            retry = outage.next_attempt - time.monotonic() if outage.next_attempt is not None else None
            self._stand_in_answering += 1
            self._task_group.start_soon(self._answer_standing_in, conn, outage.reason, retry)

    async def _answer_standing_in(self, conn: socket.socket, reason: str, retry: float | None) -> None:
        try:
            await unavailable.answer_503(conn, reason, retry)
        except Exception:  # a bug here must not end the supervisor's task group
            log.exception("answering 503 failed")
            conn.close()
        finally:
            self._stand_in_answering -= 1

    # --- reporting -----------------------------------------------------------------------

    def _emit(self, message: str, level: int = logging.INFO) -> None:
        log.log(level, "%s", message)
        if self._on_event is not None:
            try:
                self._on_event(message)
            except Exception:
                log.exception("the on_event callback failed")

    async def _report(self, report: Report | None, line: str) -> None:
        self._emit(line)
        if report is None:
            return
        try:
            with anyio.move_on_after(_REPORT_TIMEOUT) as scope:
                result = report(line)
                if inspect.isawaitable(result):
                    await result
            if scope.cancelled_caught:
                log.warning("reporting %r took over %s; carrying on", line, _seconds(_REPORT_TIMEOUT))
        except Exception:
            log.warning("cannot report %r; carrying on", line, exc_info=True)


def _passed(child: _Child, check: str, began: float) -> None:
    waited = time.monotonic() - began
    _health_log.debug("%s (pid %d): %s passed after %.3f s", child.version, child.pid, check, waited,
                      extra={"health_wait": waited})  # fmt: skip


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner


def _receive_notifications(child: _Child) -> None:
    """Handle every sd_notify datagram waiting on the instance's notify socket."""
    while True:
        try:
            datagram = child.notify.recv(4096)
        except OSError:  # nothing waiting (EAGAIN), or already closed
            return
        for line in datagram.decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                child.ready.set()
            elif key == "STATUS":
                child.status = value
                log.info("%s (pid %d): %s", child.version, child.pid, value)
            elif key == "STOPPING" and value == "1":
                log.info("%s (pid %d) is stopping", child.version, child.pid)


async def _log_output(child: _Child, done: anyio.Event) -> None:
    """The app's stdout and stderr (one pipe) as log lines, with its version and pid as fields."""
    fields = {"app_version": child.version, "app_pid": child.pid}

    def emit(line: str) -> None:
        child.output.append(line)
        _app_output.info("%s", line, extra=fields)

    try:
        if child.process.stdout is not None:
            await logring.pump_lines(child.process.stdout, emit)
    finally:
        done.set()


def _substitute(text: str, root: Path, app_dir: Path) -> str:
    # str.replace, not str.format: commands may hold other braces (shell, awk, JSON)
    return text.replace("{app_dir}", str(app_dir)).replace("{root}", str(root))


def _kill_group(child: _Child) -> None:
    """SIGKILL the instance's process group (it leads its own session) while its pid is ours."""
    if child.process.returncode is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
