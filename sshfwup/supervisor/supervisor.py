"""Run the device's application, and swap it to a new version without refusing a connection.

The supervisor binds the application's listening sockets itself and keeps a copy of each for
its whole life; every instance of the app gets them as fds 3.. with systemd's ``LISTEN_*``
variables (see :mod:`sshfwup.app`). Because the supervisor's copy never closes, a connection that
arrives while an instance (re)starts waits in the kernel's listen queue instead of being refused.

:class:`Supervisor` is the owner: it holds the sockets, the lock (a start, a swap, a restart
attempt and a stop never interleave), the instances (:class:`~.instance.Roster`) and the task
group every instance's and every restart loop's task runs in, and hands the work to its parts:

- :mod:`~sshfwup.supervisor.launcher` starts an instance (room, environment, exec shim), owns its
  process until it is gone, and stops it (SIGTERM → ``drain_timeout`` → SIGKILL);
- :mod:`~sshfwup.supervisor.readiness` and :mod:`~sshfwup.supervisor.health`: whether an instance
  is ready, and stays healthy — proved on the sockets clients use;
- :mod:`~sshfwup.supervisor.steering`: the sockets across versions (socket paths, the hand-over);
- :mod:`~sshfwup.supervisor.swap`: one swap, start → ready → steer → hand over → drain → observe,
  or roll back (with :mod:`~sshfwup.supervisor.handoff_swap` for ``[app] handoff``);
- :mod:`~sshfwup.supervisor.crashes`: an exit outside a swap, the restart loop, the crash loop;
- :mod:`~sshfwup.supervisor.standin`: while no version runs, the outage and the stand-in;
- :mod:`~sshfwup.supervisor.events`: the lines it tells (``on_event``, the uploader's report).

:attr:`Supervisor.last_exit` keeps how the last instance that failed ended and its last lines of
output; :attr:`Supervisor.outage` why no version runs now. Every name this module exported before
its parts moved out is importable from here still.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc

from sshfwup.config import AppConfig, SocketSpec

from . import listeners
from .crashes import CrashLoopHandler, CrashWatch
from .errors import AppNotReady, NotReady, SupervisorError, SwapFailed
from .events import Events, Report
from .health import Health
from .instance import LAST_OUTPUT_LINES, LOGGER, AppExit, AppSource, Child, Instance, Outage, Roster, describe_exit
from .launcher import (
    HEALTH_SOCKET_NAME,
    INSTANCE_VARIABLE,
    MARKER_VARIABLE,
    InstanceIds,
    Launcher,
    kill_strays,
    marked_processes,
)
from .listeners import Listener
from .readiness import Readiness
from .standin import StandIn
from .steering import Steering
from .swap import Swap, SwapResult

__all__ = [
    "HEALTH_SOCKET_NAME",
    "INSTANCE_VARIABLE",
    "LAST_OUTPUT_LINES",
    "MARKER_VARIABLE",
    "AppExit",
    "AppNotReady",
    "AppSource",
    "Outage",
    "CrashLoopHandler",
    "Instance",
    "Listener",
    "Report",
    "SupervisorError",
    "SwapFailed",
    "SwapResult",
    "Supervisor",
    "bind_listeners",
    "kill_strays",
    "marked_processes",
]

log = logging.getLogger(LOGGER)  # == __name__: every part of the supervisor logs as this module


def bind_listeners(specs: tuple[SocketSpec, ...], *, steer: bool = True) -> tuple[Listener, ...]:
    """Bind and listen on every socket; all or nothing (see :mod:`sshfwup.supervisor.listeners`)."""
    try:
        return listeners.bind_listeners(specs, steer=steer)
    except listeners.ListenerError as e:
        raise SupervisorError(str(e)) from e


@dataclass(frozen=True)
class _Parts:
    """The supervisor's collaborators while it runs (made once its sockets and task group exist)."""

    launcher: Launcher
    readiness: Readiness
    health: Health
    steering: Steering
    stand_in: StandIn
    crashes: CrashWatch


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
        ``on_crash_loop``: see :mod:`sshfwup.supervisor.crashes` and ``[app] rollback_after_crashes``."""
        if not marker or "\0" in marker:
            raise ValueError("marker must be a non-empty string without NUL")
        self._config = config
        self._steer_sockets = steer
        self._marker = marker
        self._events = Events(on_event)
        self._on_crash_loop = on_crash_loop
        self._ids = InstanceIds(marker)
        self._roster = Roster()
        self._listeners: tuple[Listener, ...] = ()
        self._lock = anyio.Lock()  # start, swap, stop and crash restarts never interleave
        self._task_group: anyio.abc.TaskGroup | None = None
        self._exit_stack: AsyncExitStack | None = None
        self._parts: _Parts | None = None
        self._last_exit: AppExit | None = None

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
        self._roster.closing = False
        for listener in self._listeners:
            log.info("listening on %s (%s; socket path %s)", listener.address, listener.name, listener.path)
        self._parts = self._assemble(self._task_group)
        if self._listeners:
            self._task_group.start_soon(self._parts.stand_in.run)
        return self

    def _assemble(self, tasks: anyio.abc.TaskGroup) -> _Parts:
        config, roster, bound = self._config, self._roster, self._listeners
        stand_in = StandIn(config, roster, bound, self._lock, tasks)
        launcher = Launcher(config, roster, bound, tasks, marker=self._marker, ids=self._ids, on_exit=self._exited)
        readiness = Readiness(config, roster, bound, launcher, on_ready=stand_in.clear)
        steering = Steering(bound, roster)
        crashes = CrashWatch(
            config, roster, launcher=launcher, readiness=readiness, steering=steering, stand_in=stand_in,
            events=self._events, exclusive=self._exclusive, tasks=tasks, on_crash_loop=self._on_crash_loop,
        )  # fmt: skip
        return _Parts(launcher, readiness, Health(config, readiness), steering, stand_in, crashes)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._exit_stack is not None and self._task_group is not None
        stack, self._exit_stack = self._exit_stack, None
        self._roster.closing = True
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
        current = self._roster.current
        return current.snapshot() if current else None

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
        return self._parts.stand_in.outage if self._parts is not None else None

    async def start(self, source: AppSource) -> Instance:
        """Start the app from ``source`` and wait until it is ready; keep it running afterwards.

        Raises :class:`AppNotReady` (and leaves nothing running) if it is not ready in time.
        """
        parts = self._open()
        async with self._exclusive():
            current = self._roster.current
            if current is not None and current.returncode is None:
                raise SupervisorError(f"the application already runs ({current.version}, pid {current.pid})")
            child: Child | None = None
            try:
                child = await parts.launcher.launch(
                    source, sockets=parts.steering.serving_sockets(), restarts=0, failures=0
                )
                await parts.readiness.wait_ready(child)
            except NotReady as e:
                if self._roster.current is None or self._roster.current.returncode is not None:
                    parts.stand_in.mark_down(f"{source.version} {e}")
                raise AppNotReady(f"{source.version} {e}", pid=child.pid if child else None) from None
            self._roster.current = child
            child.supervised = True
            self._events.emit(f"{source.version} from slot {source.slot} is ready (pid {child.pid})")
            return child.snapshot()

    async def swap(self, source: AppSource, *, report: Report | None = None) -> SwapResult:
        """Replace the running version with the one in ``source``; see :mod:`sshfwup.supervisor.swap`.

        ``report`` receives one line per stage ("new version 2.0.0 ready in 0.31 s") for the
        uploader. Raises :class:`SwapFailed` after rolling back.
        """
        parts = self._open()
        async with self._exclusive():
            swap = Swap(
                source, report, config=self._config, roster=self._roster, launcher=parts.launcher,
                readiness=parts.readiness, health=parts.health, steering=parts.steering, crashes=parts.crashes,
                events=self._events,
            )  # fmt: skip
            return await swap.run()

    async def wait_healthy(self, duration: float) -> bool:
        """True if the current instance stays alive (and passes its probes) for ``duration``."""
        return await self.watch_health(duration) is None

    async def watch_health(self, duration: float) -> str | None:
        """Watch the current instance for ``duration`` as a swap's observation window does: None
        if it stayed alive and passed every round of checks, else what went wrong."""
        parts = self._open()
        child = self._roster.current
        problem = self._not_serving(child)
        if problem is not None or child is None:
            return problem
        problem = await parts.health.watch(child, duration)
        return f"{child.version} {problem}" if problem else None

    async def check_health(self) -> str | None:
        """One round of checks on the current instance, now (what boot validation asks right
        before it validates): None if it runs, is ready and passes them, else what is wrong."""
        parts = self._open()
        child = self._roster.current
        problem = self._not_serving(child)
        if problem is not None or child is None:
            return problem
        problem = await parts.health.verdict(child, rounds=self._config.health_failures)
        if problem is None and child.exited.is_set():
            problem = child.describe_exit()
        return f"{child.version} {problem}" if problem else None

    @staticmethod
    def _not_serving(child: Child | None) -> str | None:
        if child is None:
            return "the app is not running"
        if child.process.returncode is not None or child.exited.is_set():
            return f"{child.version} {describe_exit(child.process.returncode)}"
        if child.ready_at is None:
            return f"{child.version} is not ready (pid {child.pid})"
        return None

    async def stop(self) -> None:
        """Stop the app (SIGTERM → drain_timeout → SIGKILL). The sockets stay bound; nothing
        answers on them until the next start (connections wait in the queue)."""
        async with self._exclusive():
            parts = self._parts
            current, self._roster.current = self._roster.current, None
            if parts is None:
                return  # never entered: nothing was started
            parts.stand_in.clear()  # stopped on purpose: not an outage to answer for
            for child in sorted(self._roster.children, key=lambda c: c is not current):
                await parts.launcher.stop(child)
            parts.steering.release_unused()
            if current is not None:
                self._events.emit(f"{current.version} stopped ({current.describe_exit()})")

    # --- the owner's own business --------------------------------------------------------

    def _open(self) -> _Parts:
        """The parts, while the supervisor runs and has an app to run (else SupervisorError)."""
        if self._task_group is None or self._exit_stack is None or self._parts is None:
            raise SupervisorError("the supervisor is not running (use it as 'async with Supervisor(...)')")
        if not self._config.command:
            raise SupervisorError("[app] command is empty: there is no application to run")
        return self._parts

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """The supervisor's lock, for anything that starts, swaps or stops instances: the
        stand-in stops accepting first (an instance about to start owns the queue), and may
        answer again once the lock is free."""
        async with self._lock:
            if self._parts is not None:
                await self._parts.stand_in.stand_down()
            try:
                yield
            finally:
                if self._parts is not None:
                    self._parts.stand_in.wake()

    def _exited(self, child: Child) -> None:
        """The launcher's word that ``child`` is gone: remember how an unasked exit ended, and let
        the crash watch decide what it means."""
        if not child.stopping or child.failure is not None:
            self._record_exit(child)
        assert self._parts is not None
        self._parts.crashes.exited(child)

    def _record_exit(self, child: Child) -> None:
        reason = child.failure or f"{child.version} {child.describe_exit()}"
        if child.ready_at is None and child.failure is None:
            reason += " before it became ready" + (f" ({child.status})" if child.status else "")
        self._last_exit = AppExit(
            version=child.version, slot=child.source.slot, pid=child.pid, returncode=child.returncode,
            at=time.time(), reason=reason, output=tuple(child.output),
        )  # fmt: skip


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    inner: BaseException = group
    while isinstance(inner, BaseExceptionGroup):
        if len(inner.exceptions) != 1:
            return None
        inner = inner.exceptions[0]
    return inner
