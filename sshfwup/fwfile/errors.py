"""The errors of everything in :mod:`sshfwup.fwfile`.

Every error is a :class:`FirmwareError`: ``str(error)`` is written for an operator,
``error.fwup_message`` is what the real fwup prints in the same situation (the fwup stand-in
reports that, so tests hold against both).
"""

from __future__ import annotations


class FirmwareError(Exception):
    """A firmware archive is unreadable, corrupt, unsigned, or cannot be built.

    ``str(e)`` is for an operator; ``e.fwup_message`` is fwup's own wording for the problem.
    """

    def __init__(self, message: str, *, fwup_message: str | None = None) -> None:
        super().__init__(message)
        self.fwup_message = fwup_message or message


class ArchiveInputError(FirmwareError):
    """The bytes could not be read at all (framing broken, stdin closed early)."""


class UBootEnvError(FirmwareError):
    """A U-Boot environment block is invalid or the variables do not fit."""
