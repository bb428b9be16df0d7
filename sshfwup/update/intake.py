"""The bounds every upload is held to, whatever carries its bytes.

``ssh -s fwup`` and ``sshfwup upload`` (one subsystem), ``scp`` (SFTP mode), ``scp -O`` and
``sftp`` each read the upload their own way, but each takes every chunk through
:meth:`Intake.read`, so all five end an upload for the same reasons, with the same words:

- **idle**: nothing arrived for ``[server] idle_timeout`` seconds (a client that stopped
  sending, a link that went silent without a FIN, a stall before the first byte);
- **total**: the upload still running ``[server] upload_timeout`` seconds after it took the
  update lock (a client trickling a byte now and then, just inside the idle bound);
- **size**: more than ``[server] max_upload_size`` bytes — counted by :class:`Update` from the
  bytes themselves, whatever a client announced (scp's header is checked as well, earlier).

When a bound ends an upload the update is aborted: fwup is killed before it can read the
archive's end (nothing is switched), and the update lock goes as the transport leaves its
``async with Update(...)`` block — within a second, not when the connection finally closes.
The end of an upload (genuine EOF, the archive's end record) is :meth:`Update.finish`'s rule,
the same for all five.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

import anyio

from sshfwup.config import ServerConfig

from .outcome import UpdateError

log = logging.getLogger(__name__)

__all__ = ["CUT", "Intake", "UploadBounds", "UploadStopped"]

#: the end-of-upload rule's words, on every transport: a polite disconnect, a killed client, a
#: session or file closed before the whole archive came — never taken for a complete upload
CUT = "the client disconnected before finishing the upload"


@dataclass(frozen=True)
class UploadBounds:
    idle: float  # seconds without a byte
    total: float  # seconds from the lock to the end; 0 = none
    size: int  # bytes; 0 = none (enforced by Update.write)

    @classmethod
    def of(cls, server: ServerConfig) -> "UploadBounds":
        return cls(idle=server.idle_timeout, total=server.upload_timeout, size=server.max_upload_size)

    def idle_words(self) -> str:
        return f"no data for {self.idle:.0f} s ([server] idle_timeout); upload aborted"

    def total_words(self) -> str:
        return f"the upload took longer than {self.total:.0f} s ([server] upload_timeout); upload aborted"


class UploadStopped(UpdateError):
    """A bound ended the upload; the message says which (the same on every transport)."""


class _Abortable(Protocol):
    def abort(self, reason: str) -> None: ...


class Intake:
    """One upload's bounds: ``await intake.read(receive)`` returns the next chunk, or aborts the
    update and raises :class:`UploadStopped`."""

    def __init__(self, update: _Abortable, bounds: UploadBounds, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._update = update
        self.bounds = bounds
        self._clock = clock
        self._deadline = clock() + bounds.total if bounds.total else math.inf

    async def read(self, receive: Callable[[], Awaitable[bytes]]) -> bytes:
        left = self._deadline - self._clock()
        if left <= 0:
            self.stop(self.bounds.total_words())
        try:
            with anyio.fail_after(min(self.bounds.idle, left)):
                return await receive()
        except TimeoutError:
            pass
        self.stop(self.bounds.total_words() if self._clock() >= self._deadline else self.bounds.idle_words())

    def stop(self, reason: str) -> NoReturn:
        log.warning("upload stopped: %s", reason)
        self._update.abort(reason)
        raise UploadStopped(reason)
