"""How an update ends, as its uploader is told: who uploaded (``Uploader``), the ``Outcome`` and its
exit status, and the failures whose message is for the uploader (``UpdateError``, ``UpdateRefused``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_OK", "Outcome", "UpdateError", "UpdateRefused", "Uploader"]

EXIT_OK = 0
EXIT_FAILED = 1


class UpdateError(Exception):
    """The update failed; the message is for the uploader."""


class UpdateRefused(UpdateError):
    """Refused before a byte reached fwup: nothing on the device changed."""


@dataclass(frozen=True)
class Uploader:
    user: str
    fingerprint: str
    peer: str
    transport: str

    def __str__(self) -> str:
        return f"{self.user}@{self.peer} key {self.fingerprint} via {self.transport}"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    verdict: str
    reboot: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED
