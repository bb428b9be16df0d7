"""While no version of the app runs: the outage, and the supervisor standing in on the app's sockets.

While no instance runs — it crashed and waits for its restart, or it does not start — the
supervisor itself answers on the public sockets once ``[app] unavailable_after`` seconds passed
without one (:mod:`sshfwup.supervisor.unavailable`): ``503 Service Unavailable`` with the reason on the
sockets named in ``[app] http_sockets``, a reset on the others, so that clients get an answer
instead of waiting in the queue until they give up. It stops before any instance is started
(a start, a swap, a restart attempt, a stop all take the supervisor's lock, and stand it down
first), so it never takes a connection an instance could accept. :attr:`Supervisor.outage` says
why no version runs now.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time

import anyio
import anyio.abc

from sshfwup.config import AppConfig

from . import unavailable
from .instance import LOGGER, Outage, Roster
from .listeners import Listener

__all__ = ["StandIn"]

log = logging.getLogger(LOGGER)

_STAND_IN_CONNECTIONS = 32  # 503 answers in progress at once; beyond, connections are reset


class StandIn:
    """The outage (why no version runs, since when, the next attempt) and the stand-in that
    answers for the app meanwhile: :meth:`run` is its task, woken whenever the outage or the
    supervisor's lock changes."""

    def __init__(
        self,
        config: AppConfig,
        roster: Roster,
        listeners: tuple[Listener, ...],
        lock: anyio.Lock,
        tasks: anyio.abc.TaskGroup,
    ) -> None:
        """``lock``: the supervisor's; while it is held an instance may be about to start.
        ``tasks``: the supervisor's task group, which owns the 503 answers in progress."""
        self._config = config
        self._roster = roster
        self._listeners = listeners
        self._lock = lock
        self._tasks = tasks
        self.outage: Outage | None = None
        self._wake = anyio.Event()
        # Its cancel scope and done event while it accepts on the public sockets.
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self._answering = 0

    # --- the outage

    def mark_down(self, reason: str) -> None:
        """No version runs (after a crash or a failed start): remember why; the stand-in answers
        once ``unavailable_after`` passed since the outage began."""
        if self._roster.closing:
            return
        since = self.outage.since if self.outage is not None else time.monotonic()
        self.outage = Outage(reason, since)
        self.wake()

    def next_attempt_in(self, delay: float) -> None:
        if self.outage is not None:
            self.outage = dataclasses.replace(self.outage, next_attempt=time.monotonic() + delay)

    def clear(self) -> None:
        """A version is ready again, or the app was stopped on purpose: no outage to answer for."""
        self.outage = None

    # --- the stand-in

    def wake(self) -> None:
        self._wake.set()

    async def stand_down(self) -> None:
        """Stop accepting (an instance about to start owns the queue); returns once it accepts nothing."""
        scope, done = self._scope, self._done
        if scope is None or done is None:
            return
        scope.cancel()
        with anyio.CancelScope(shield=True):
            await done.wait()  # it accepts nothing once this returns

    def _may_stand_in(self) -> bool:
        return (
            self.outage is not None
            and not self._roster.closing
            and not self._lock.locked()
            and not self._roster.any_running()
        )

    async def run(self) -> None:
        """Answer on the public sockets while no version runs (see the module doc)."""
        while True:
            wake = self._wake = anyio.Event()
            outage = self.outage
            if not self._may_stand_in() or outage is None:
                await wake.wait()
                continue
            wait = outage.since + self._config.unavailable_after - time.monotonic()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await wake.wait()
                continue
            # No await between the check above and publishing the scope: stand_down sees it.
            done = self._done = anyio.Event()
            with anyio.CancelScope() as scope:
                self._scope = scope
                log.info("no version of the app runs (%s): answering on its sockets meanwhile", outage.reason)
                try:
                    async with anyio.create_task_group() as tasks:
                        for listener in self._listeners:
                            tasks.start_soon(self._accept, listener)
                finally:
                    self._scope = None
                    done.set()

    async def _accept(self, listener: Listener) -> None:
        sock = listener.sock
        http = listener.name in self._config.http_sockets
        while True:
            try:
                await anyio.wait_readable(sock)
            except (OSError, anyio.ClosedResourceError) as e:  # never takes the supervisor down
                log.error("%s: cannot wait for connections while the app is down: %s", listener.name, e)
                return
            if self._scope is None or self._scope.cancel_called or not self._may_stand_in():
                return  # an instance is about to start: the queue is its own
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # out of fds: the connection stays queued, try again shortly
                log.warning("%s: cannot accept while the app is down: %s", listener.name, e.strerror or e)
                await anyio.sleep(0.1)
                continue
            if not http or self._answering >= _STAND_IN_CONNECTIONS:
                unavailable.close_at_once(conn)
                continue
            outage = self.outage
            assert outage is not None
            retry = outage.next_attempt - time.monotonic() if outage.next_attempt is not None else None
            self._answering += 1
            self._tasks.start_soon(self._answer, conn, outage.reason, retry)

    async def _answer(self, conn: socket.socket, reason: str, retry: float | None) -> None:
        try:
            await unavailable.answer_503(conn, reason, retry)
        except Exception:  # a bug here must not end the supervisor's task group
            log.exception("answering 503 failed")
            conn.close()
        finally:
            self._answering -= 1
