"""What the uploader sees: fwup's events and our stage lines, rendered as text on the channel."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .fwup import Failure, FwupEvent, Message, Progress, Success, TextRenderer

log = logging.getLogger(__name__)

__all__ = ["Report"]

Writer = Callable[[str], Awaitable[None]]


class Report:
    """Text for one uploader. Never raises: a vanished uploader must not stop an update."""

    def __init__(self, write: Writer | None = None) -> None:
        self._write = write
        self._renderer = TextRenderer()
        self.lines: list[str] = []  # our own lines, kept for the journal and the log
        self._logged_quarter = -1

    async def event(self, event: FwupEvent) -> None:
        self._log(event)
        await self._send(self._renderer.render(event))

    def _log(self, event: FwupEvent) -> None:
        """fwup's messages, and its progress in quarters, for `ssh device logs -f`."""
        if isinstance(event, Progress):
            if event.percent // 25 > self._logged_quarter:
                self._logged_quarter = event.percent // 25
                log.info("fwup %d%%", event.percent)
        elif isinstance(event, (Message, Failure)):
            log.log(logging.WARNING if isinstance(event, Failure) else logging.INFO, "fwup: %s", event.text)
        elif isinstance(event, Success):
            log.info("fwup: Success!")

    async def line(self, text: str) -> None:
        """A stage line of our own, e.g. ``sshfwup: mounted slot b (0.05 s)``."""
        self.lines.append(text)
        log.info("%s", text)
        await self._send(self._renderer.line(text))

    async def error(self, reason: str) -> None:
        """An error before or around fwup, in ssh_subsystem_fwup's form ``Error: <reason>``."""
        await self.line(f"Error: {reason}")

    async def _send(self, text: str) -> None:
        if not text or self._write is None:
            return
        try:
            await self._write(text)
        except Exception as e:  # the channel closed under us; keep going, the journal has the truth
            log.debug("uploader output dropped (%s)", e)
            self._write = None
