"""When the running version exits unasked: restart it with backoff, and after a crash loop, maybe another.

Outside a swap, an instance that exits is restarted from the same source, on the same sockets,
with exponential backoff (``restart_backoff``: first delay, maximum; a crash after running at
least the maximum delay starts again from the first) once the processes it left behind are gone.
An exit during a swap belongs to the swap, never to the restart loop. After
``rollback_after_crashes`` failures in a row the ``on_crash_loop`` handler may name another
source to start instead (the daemon's: the running root's firmware for a hot-swapped version).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import anyio
import anyio.abc

from sshfwup.config import AppConfig

from .errors import NotReady
from .events import Events
from .instance import LOGGER, AppSource, Child, Instance, Roster, seconds
from .launcher import Launcher
from .readiness import Readiness
from .standin import StandIn
from .steering import Steering

__all__ = ["CrashLoopHandler", "CrashWatch"]

log = logging.getLogger(LOGGER)

#: ``Supervisor(on_crash_loop=...)``: called once the app failed ``[app] rollback_after_crashes``
#: times in a row, with the last failed instance and that count, before the next restart. Returns
#: the source to start instead (at once), or None to go on restarting the same one with backoff.
CrashLoopHandler = Callable[[Instance, int], Awaitable[AppSource | None]]

_CRASH_LOOP_TIMEOUT = 120.0  # the crash-loop handler's bound (it may wait for the update lock)


class CrashWatch:
    """Decides what an exit means, and runs the restart loop (a task in the supervisor's task
    group, which cancels it when the supervisor stops)."""

    def __init__(
        self,
        config: AppConfig,
        roster: Roster,
        *,
        launcher: Launcher,
        readiness: Readiness,
        steering: Steering,
        stand_in: StandIn,
        events: Events,
        exclusive: Callable[[], AbstractAsyncContextManager[None]],
        tasks: anyio.abc.TaskGroup,
        on_crash_loop: CrashLoopHandler | None,
    ) -> None:
        """``exclusive``: the supervisor's lock (see ``Supervisor._exclusive``), taken for each
        restart attempt."""
        self._config = config
        self._roster = roster
        self._launcher = launcher
        self._readiness = readiness
        self._steering = steering
        self._stand_in = stand_in
        self._events = events
        self._exclusive = exclusive
        self._tasks = tasks
        self._on_crash_loop = on_crash_loop

    def exited(self, child: Child) -> None:
        """``child`` is gone: a crash of the current version starts the restart loop."""
        if self._roster.closing or child.stopping or not child.supervised or child is not self._roster.current:
            return  # stopped on purpose, or a start/swap in progress owns it
        self._stand_in.mark_down(f"{child.version} {child.describe_exit()}")
        maximum = self._config.restart_backoff[1]
        ran = time.monotonic() - child.started_at
        failures = 1 if ran >= maximum else child.failures + 1
        self._tasks.start_soon(self._restart_after_crash, child, failures)

    def could_not_restore(self, failed: Child, reason: str) -> None:
        """A rollback could not start the old version again: it is down, and retried with backoff."""
        self._roster.current = failed
        self._stand_in.mark_down(reason)
        self._tasks.start_soon(self._restart_after_crash, failed, 1)

    async def _restart_after_crash(self, crashed: Child, failures: int) -> None:
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
                self._events.emit(
                    f"{source.version} failed {failures} times in a row; starting {replacement.version}"
                    f" from slot {replacement.slot} instead",
                    logging.ERROR,
                )
                source, restarts, failures = replacement, 0, 0
            else:
                delay = min(first * 2 ** (failures - 1), maximum)
                again = "restarting" if source is crashed.source else f"starting {source.version}"
                self._events.emit(
                    f"{crashed.version} (pid {crashed.pid}) {crashed.describe_exit()}; {again} in {seconds(delay)}",
                    logging.WARNING,
                )
                self._stand_in.next_attempt_in(delay)
                await anyio.sleep(delay)
            async with self._exclusive():
                if self._roster.current is not crashed or self._roster.closing:
                    return  # a swap, start or stop took over meanwhile
                child: Child | None = None
                try:
                    child = await self._launcher.launch(
                        source, sockets=self._steering.serving_sockets(), restarts=restarts, failures=failures
                    )
                    self._roster.current = child
                    await self._readiness.wait_ready(child)
                except NotReady as e:
                    self._events.emit(f"{source.version} {e}", logging.WARNING)
                    self._stand_in.mark_down(f"{source.version} {e}")
                    crashed = child or crashed  # the failed attempt is the one to replace next
                    failures += 1
                    restarts += 1
                    continue
                child.supervised = True
                self._events.emit(f"{child.version} restarted (pid {child.pid}, restart {child.restarts})")
                return

    async def _crash_loop(self, crashed: Child, source: AppSource, failures: int) -> AppSource | None:
        """What ``on_crash_loop`` says once ``failures`` reached the limit (None: keep restarting).
        Bounded; a callback that fails is logged and restarting goes on."""
        limit = self._config.rollback_after_crashes
        if self._on_crash_loop is None or limit <= 0 or failures < limit:
            return None
        instance = dataclasses.replace(crashed.snapshot(), source=source)
        try:
            with anyio.move_on_after(_CRASH_LOOP_TIMEOUT):
                return await self._on_crash_loop(instance, failures)
            log.error("the crash-loop handler did not finish within %s; restarting %s", seconds(_CRASH_LOOP_TIMEOUT),
                      source.version)  # fmt: skip
        except Exception:
            log.exception("the crash-loop handler failed; restarting %s", source.version)
        return None
