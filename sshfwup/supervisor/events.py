"""What the supervisor tells as it goes: one line per event — logged, and passed to the daemon's
``on_event`` — and during a swap also reported to the uploader, one line per stage."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import anyio

from .instance import LOGGER, seconds

__all__ = ["Events", "Report"]

log = logging.getLogger(LOGGER)

#: ``Supervisor.swap(report=...)``: receives one line per stage ("new version 2.0.0 ready in 0.31 s").
Report = Callable[[str], Awaitable[None] | None]
_REPORT_TIMEOUT = 5.0  # a stuck uploader channel must not stall a swap


class Events:
    """Tells each event line; a callback that fails or hangs never stops the supervisor."""

    def __init__(self, on_event: Callable[[str], None] | None) -> None:
        self._on_event = on_event

    def emit(self, message: str, level: int = logging.INFO) -> None:
        log.log(level, "%s", message)
        if self._on_event is not None:
            try:
                self._on_event(message)
            except Exception:
                log.exception("the on_event callback failed")

    async def emit_async(self, line: str) -> None:
        """:meth:`emit` where a ``say`` coroutine is wanted (no uploader to report to)."""
        self.emit(line)

    async def report(self, report: Report | None, line: str) -> None:
        """:meth:`emit`, and pass the line to ``report`` (bounded: a swap never waits on it long)."""
        self.emit(line)
        if report is None:
            return
        try:
            with anyio.move_on_after(_REPORT_TIMEOUT) as scope:
                result = report(line)
                if inspect.isawaitable(result):
                    await result
            if scope.cancelled_caught:
                log.warning("reporting %r took over %s; carrying on", line, seconds(_REPORT_TIMEOUT))
        except Exception:
            log.warning("cannot report %r; carrying on", line, exc_info=True)
