"""The errors of ``sshfwup vm``: each message says what went wrong and what to do."""

from __future__ import annotations

__all__ = ["BootTimeout", "ToolMissing", "VmError"]


class VmError(Exception):
    """Building or running the QEMU device failed; the message is for the operator."""


class ToolMissing(VmError):
    """A host tool the QEMU device needs is not installed (the message names the packages)."""


class BootTimeout(VmError):
    """The VM did not become reachable within its bound (the message ends with the console's last lines)."""
