"""A swap: replace the running version with a new one without refusing a connection, or roll back.

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

With ``[app] handoff`` the new version takes over the old one's state and connections while it
gets ready, and a failed new version hands them back (:mod:`sshfwup.supervisor.handoff_swap`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from sshfwup.config import AppConfig

from . import handoff_swap
from .crashes import CrashWatch
from .errors import NotReady, SupervisorError, SwapFailed
from .events import Events, Report
from .health import Health
from .instance import AppSource, Child, Roster, seconds
from .launcher import Launcher
from .readiness import Readiness
from .steering import Steering

__all__ = ["Swap", "SwapResult"]

Say = Callable[[str], Awaitable[None]]


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


class Swap:
    """One swap of the current version for the one in ``source``, under the supervisor's lock:
    :meth:`run` once. ``report`` receives one line per stage (see :class:`~.events.Events`)."""

    def __init__(
        self,
        source: AppSource,
        report: Report | None,
        *,
        config: AppConfig,
        roster: Roster,
        launcher: Launcher,
        readiness: Readiness,
        health: Health,
        steering: Steering,
        crashes: CrashWatch,
        events: Events,
    ) -> None:
        self._source = source
        self._report = report
        self._config = config
        self._roster = roster
        self._launcher = launcher
        self._readiness = readiness
        self._health = health
        self._steering = steering
        self._crashes = crashes
        self._events = events
        # How far it got: what a rollback must undo, and the figures of the SwapResult
        self._old: Child | None = None
        self._new: Child | None = None
        self._old_stopped = False
        self._ready_seconds = self._drain_seconds = self._handover_seconds = 0.0

    async def _say(self, line: str) -> None:
        await self._events.report(self._report, line)

    async def run(self) -> SwapResult:
        """The protocol, top to bottom: start → ready → steer → hand over → drain → observe; any
        failure of the new version rolls back (raises :class:`SwapFailed`)."""
        config, version = self._config, self._source.version
        old = self._old = self._roster.current
        if old is None:
            raise SupervisorError("no application is running: start it before swapping")
        old.supervised = False  # from here on, an exit of the old version is the swap's business
        began = time.monotonic()
        path = self._steering.socket_path()
        try:
            await self._say(
                f"swapping {old.version} (pid {old.pid}) for {version}"
                f" from slot {self._source.slot} ({config.strategy}); socket path {path}"
            )
            sockets = self._steering.fresh_sockets()
            if config.strategy == "stop-first":  # new connections wait in the new sockets' queues
                await self._hand_over(sockets, taker=f"wait for {version}")
                await self._drain()
            new = await self._start_until_ready(sockets)
            if config.strategy == "overlap":
                proved = self._readiness.public_checks(new)  # at readiness; not those shared with the old version
                await self._hand_over(sockets, taker=f"go to {version}", new=new)
                await self._drain()
                await self._health.prove_after_drain(new, proved, old, self._say)
            await self._observe(new)
        except NotReady as e:
            with anyio.CancelScope(shield=True):  # a rollback is never left half-done
                failure = await self._roll_back(f"{version} {e}")
            raise failure from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._leave_one_serving()
            raise
        return await self._complete(old, new, began, path)

    # --- the stages, in order

    async def _start_until_ready(self, sockets: tuple[socket.socket, ...]) -> Child:
        """Start the new version on ``sockets`` and wait until it is ready; with hand-off it takes
        over the old version's state meanwhile (overlap). It is the current version from then on."""
        assert self._old is not None
        launched = time.monotonic()
        donor = self._old if self._config.strategy == "overlap" else None
        new = self._new = await self._launcher.launch(self._source, sockets=sockets, restarts=0, failures=0, donor=donor)
        transfer = await handoff_swap.wait_ready_taking_over(self._readiness.wait_ready, self._config, new, donor)
        self._ready_seconds = time.monotonic() - launched
        if transfer is not None:  # first: the old version waits for its verdict, paused
            await handoff_swap.settle(self._old, transfer, self._say)
        await self._say(f"new version {self._source.version} ready in {self._ready_seconds:.2f} s (pid {new.pid})")
        self._roster.current = new
        return new

    async def _hand_over(self, sockets: tuple[socket.socket, ...], *, taker: str, new: Child | None = None) -> None:
        """Steer new connections to ``sockets``; wait until the old version took what was queued for it."""
        assert self._old is not None
        self._handover_seconds = await self._steering.hand_over(self._old, sockets, self._say, taker=taker, new=new)

    async def _drain(self) -> None:
        """SIGTERM the old version, SIGKILL after drain_timeout; then release the sockets nobody holds."""
        old = self._old
        assert old is not None
        if old.exited.is_set():
            await self._say(f"old version {old.version} had already stopped ({old.describe_exit()})")
            self._drain_seconds = 0.0
        else:
            drained, killed = await self._launcher.stop(old)
            if killed:
                await self._say(
                    f"old version {old.version} did not stop within {seconds(self._config.drain_timeout)}"
                    " of SIGTERM: killed"
                )
            else:
                await self._say(f"old version {old.version} drained in {drained:.2f} s")
            self._drain_seconds = drained
        self._old_stopped = True
        self._steering.release_unused()

    async def _observe(self, new: Child) -> None:
        """Watch the new version for ``observe`` seconds (raises NotReady if it fails)."""
        if self._config.observe > 0:
            await self._say(f"watching {self._source.version} for {seconds(self._config.observe)}")
            problem = await self._health.watch(new, self._config.observe)
            if problem:
                raise NotReady(f"{problem} during the observation window")

    async def _complete(self, old: Child, new: Child, began: float, path: str) -> SwapResult:
        new.supervised = True
        total = time.monotonic() - began
        await self._say(f"swap complete: {self._source.version} serves (pid {new.pid}); {total:.2f} s in all")
        return SwapResult(
            strategy=self._config.strategy,
            old_version=old.version,
            new_version=self._source.version,
            old_pid=old.pid,
            new_pid=new.pid,
            ready_seconds=self._ready_seconds,
            drain_seconds=self._drain_seconds,
            observe_seconds=self._config.observe,
            total_seconds=total,
            old_returncode=old.returncode,
            ready_at=new.ready_at or 0.0,
            socket_path=path,
            handover_seconds=self._handover_seconds,
            handoff=new.taken.verdict() if new.taken else "",
        )

    # --- or roll back

    async def _roll_back(self, reason: str) -> SwapFailed:
        """Stop the new version, bring the old one back; the SwapFailed that tells the caller."""
        old, new = self._old, self._new
        assert old is not None
        await self._say(reason)
        if new is not None and new.failure is None:
            new.failure = reason
        # With hand-off, a new version still running once the old one is gone hands back.
        donor = new if new is not None and handoff_swap.can_hand_back(new, old) else None
        handoff_swap.keep(old)  # before stopping the new version: the old one waits, frozen
        if new is not None and donor is None:
            await self._abandon(new)
        restored, rollback = await self._restore(donor=donor, failed=new, say=self._say)
        if donor is not None:
            handoff_swap.keep(donor)  # it did not hand back: paused until told, it could not drain
            await self._launcher.stop(donor)
        self._steering.release_unused()
        await self._say(rollback)
        return SwapFailed(
            reason,
            rollback=rollback,
            new_pid=new.pid if new else None,
            restored=restored.snapshot() if restored else None,
        )

    async def _leave_one_serving(self) -> None:
        """Cancelled (or a bug): leave one version serving — the new one only if it was ready and
        the old one is gone already."""
        new = self._new
        if new is not None and (not self._old_stopped or new.ready_at is None):
            await self._abandon(new)
            new = None
        if new is None:
            await self._restore()
        else:
            new.supervised = True
        self._steering.release_unused()

    async def _abandon(self, new: Child) -> None:
        """Stop the new version; while the old one still runs, it receives new connections first."""
        old = self._old
        assert old is not None
        if not old.exited.is_set() and not old.stopping:
            self._steering.steer_back(old.sockets)
        await self._launcher.stop(new)

    async def _restore(
        self, *, donor: Child | None = None, failed: Child | None = None, say: Say | None = None
    ) -> tuple[Child | None, str]:
        """Make the old version serve again: it still does (new connections go to it again), or
        start it again from its source on the sockets that receive new connections now — taking
        the state and connections back from ``donor`` (the failed new version, still running)."""
        old = self._old
        assert old is not None
        handoff_swap.keep(old)
        if old.gave_away and not old.exited.is_set():
            await self._launcher.stop(old)  # it runs on without its state: start it again instead
        if not old.exited.is_set() and not old.stopping:
            self._steering.steer_back(old.sockets)
            old.supervised = True
            self._roster.current = old
            return old, f"{old.version} is still serving (pid {old.pid})"
        lost = handoff_swap.lost_handoff(failed, donor)
        failed = old
        try:
            child = await self._launcher.launch(
                old.source, sockets=self._steering.serving_sockets(), restarts=old.restarts, failures=0, donor=donor
            )
            self._roster.current = failed = child
            transfer = await handoff_swap.wait_ready_taking_over(self._readiness.wait_ready, self._config, child, donor)
            if transfer is not None and donor is not None:
                await handoff_swap.settle(donor, transfer, say or self._events.emit_async)
                lost = (f"; handed back {transfer.summary()}" if transfer.taken else
                        f"; {transfer.summary()}: the state and connections of {donor.version} are lost")  # fmt: skip
        except NotReady as e:
            self._crashes.could_not_restore(failed, f"{old.version} could not be started again ({e})")
            return None, f"{old.version} could not be started again ({e}); retrying with backoff"
        child.supervised = True
        return child, f"{old.version} started again from slot {old.source.slot} (pid {child.pid}){lost}"
