"""The errors of everything in :mod:`sshfwup.firmware`: each is a :class:`FirmwareError`,
whose message is written for an operator."""

from __future__ import annotations


class FirmwareError(Exception):
    """A firmware archive is unreadable, corrupt, unsigned, or cannot be built."""


class ArchiveInputError(FirmwareError):
    """The bytes could not be read at all (framing broken, stdin closed early)."""
