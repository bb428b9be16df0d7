"""Is a ready instance still healthy: the observation window, boot validation, the shared path's late proof.

During the observation window the process must stay alive and, every ``health_interval``, pass the
http/tcp probe and accept a probe connection on each public socket; boot validation runs the same
checks (:meth:`Supervisor.watch_health`, :meth:`Supervisor.check_health`).

Saturated is not dead (issue #20): at full load a probe connection may wait in the accept queue
behind busy workers, and that passes once it is accepted. A version is unhealthy when it makes no
progress: it exits; a probe connection waits while nothing at all is accepted on that socket for
``stall_timeout`` (:func:`listeners.accept_probe`; the kernel says when the probe itself is
accepted, :mod:`sshfwup.supervisor.sockdiag`); its http/tcp check does not answer within ``stall_timeout``;
or that check answers with a failure ``health_failures`` rounds in a row.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable

import anyio

from sshfwup.config import AppConfig

from .errors import NotReady
from .instance import LOGGER, Child
from .listeners import Listener
from .readiness import Readiness

__all__ = ["Health"]

log = logging.getLogger(LOGGER)
# One debug line per health check that passed, with how long it waited (``health_wait``):
# bench/stock_servers.py reports the longest under load, what [app] stall_timeout must stay above.
_health_log = logging.getLogger(f"{LOGGER}.health")


class Health:
    """Rounds of health checks on a ready instance, built from :class:`Readiness`'s probes."""

    def __init__(self, config: AppConfig, readiness: Readiness) -> None:
        self._config = config
        self._readiness = readiness

    async def _problem(self, child: Child) -> tuple[str | None, bool]:
        """One round of health checks: the http/tcp probe, and a probe connection accepted on each
        public socket (every readiness mode). Returns (None, _) if all passed, else (what failed,
        whether it is a failed answer of the health check — which counts only after
        ``[app] health_failures`` in a row — rather than no progress at all, which counts at once).

        Saturated is not dead (issue #20): a probe that waits behind busy workers passes once it
        is accepted or answered; only ``stall_timeout`` without any progress fails it."""
        config = self._config
        if child.health is not None:
            began = time.monotonic()
            problem = await self._readiness.probe(child, timeout=config.stall_timeout)
            if problem is not None:
                silent = problem.startswith("no answer within")
                what = "stopped answering its health check" if silent else "failed its health check"
                return f"{what} ({problem})", not silent
            _passed(child, f"{config.ready} check", began)
        for listener, sock in self._readiness.public_checks(child):
            began = time.monotonic()
            problem = await self._readiness.accept_probe(listener, sock, timeout=self._busy_limit(), stall=True)
            if problem is not None:
                return problem, False
            _passed(child, f"probe connection on {listener.name}", began)
        return None, False

    async def verdict(self, child: Child, *, rounds: int) -> str | None:
        """Up to ``rounds`` rounds of checks, ``health_interval`` apart, while only failed answers
        of the health check come back: None once a round passes, else the last problem."""
        for number in range(1, rounds + 1):
            problem, repeatable = await self._problem(child)
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

    async def prove_after_drain(
        self, new: Child, proved: list[tuple[Listener, socket.socket]], old: Child,
        say: Callable[[str], Awaitable[None]],
    ) -> None:
        """The shared path: a public socket the old version accepted from too can be proved only
        once it drained (raises NotReady; the old version is then started again)."""
        for listener, sock in self._readiness.public_checks(new):
            if (listener, sock) in proved:
                continue
            problem = await self._readiness.accept_probe(listener, sock, timeout=self._busy_limit(), stall=True)
            if problem is not None:
                raise NotReady(f"{problem} once {old.version} had drained")
            await say(f"{new.version} accepts on {listener.name} ({listener.address}), which {old.version} shared")

    async def watch(self, child: Child, duration: float) -> str | None:
        """Watch ``child`` for ``duration``: None if it stayed alive and healthy, else what failed.

        A round of checks every ``health_interval``, the last one at the end of the window; a
        round is not cut short by the window's end (a probe that hangs then counts), so the watch
        may last up to ``stall_timeout`` longer. A failed answer of the health check fails the
        watch after ``health_failures`` rounds in a row; no progress (see :meth:`_problem`)
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
                problem, repeatable = await self._problem(child)
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


def _passed(child: Child, check: str, began: float) -> None:
    waited = time.monotonic() - began
    _health_log.debug("%s (pid %d): %s passed after %.3f s", child.version, child.pid, check, waited,
                      extra={"health_wait": waited})  # fmt: skip
