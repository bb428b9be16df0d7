"""What the supervisor raises: to its callers (:class:`SupervisorError` and its kinds), and among its
own parts (:class:`NotReady`, always turned into one of the others before it leaves the supervisor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .instance import Instance

__all__ = ["AppNotReady", "NotReady", "SupervisorError", "SwapFailed"]


class SupervisorError(Exception):
    """The application cannot be run as asked (nothing configured, socket in use, ...)."""


class AppNotReady(SupervisorError):
    """The application did not become ready; ``reason`` says why."""

    def __init__(self, reason: str, *, pid: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pid = pid


class SwapFailed(SupervisorError):
    """The new version failed; it was stopped and the old version serves (or is being restarted).

    ``reason``: what the new version did ("2.0.0 did not become ready within 10 s");
    ``rollback``: what serves now ("1.0.0 is still serving (pid 123)").
    """

    def __init__(
        self, reason: str, *, rollback: str, new_pid: int | None, restored: Instance | None
    ) -> None:
        super().__init__(f"{reason}; {rollback}")
        self.reason = reason
        self.rollback = rollback
        self.new_pid = new_pid
        self.restored = restored


class NotReady(Exception):
    """Internal: why an instance did not make it (without the version in front)."""
