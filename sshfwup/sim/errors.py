"""The simulator's exceptions."""

from __future__ import annotations

__all__ = ["ProvisionError", "SimError"]


class SimError(Exception):
    """The simulated device could not be set up or driven (loop device, mount, config...)."""


class ProvisionError(SimError):
    """Factory provisioning (fwup's ``complete`` task or formatting the data partition) failed."""
