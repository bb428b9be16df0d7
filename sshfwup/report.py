"""What the uploader sees: fwup's events and our stage lines, rendered as text on the channel."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from .fwup import FwupEvent, TextRenderer

log = logging.getLogger(__name__)

__all__ = ["Report"]

Writer = Callable[[str], Awaitable[None]]


class Report:
    """Text for one uploader. Never raises: a vanished uploader must not stop an update."""

    def __init__(self, write: Writer | None = None) -> None:
        self._write = write
        self._renderer = TextRenderer()
        self.lines: list[str] = []  # our own lines, kept for the journal and the log

    async def event(self, event: FwupEvent) -> None:
        await self._send(self._renderer.render(event))

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
