"""The one seam for boot state: what the bootloader will boot and how sshfwup changes that.

Every part of sshfwup that asks "what boots next, is it validated, is a trial boot running" or
changes the answer (the update path, ``revert``, ``validate``, boot validation, ``status``) goes
through a :class:`BootContract`. Which variables mean what depends on the bootloader's script,
so each contract is its own backend, one file each (the way RAUC keeps one backend per
bootloader): :mod:`sshfwup.boot.uboot_bootcount` (U-Boot's ``upgrade_available``/``bootcount``/
``bootlimit``, the default), :mod:`sshfwup.boot.uboot_nerves` (a Nerves system's U-Boot script:
``nerves_fw_booted``/``nerves_fw_autovalidate``) and :mod:`sshfwup.boot.fwup_ops` (the system's
own ops archive, e.g. a Raspberry Pi's tryboot). ``[boot] contract`` in the configuration picks one.

The backends share the environment adapter (:class:`sshfwup.boot.bootenv.BootEnv`) and sshfwup's
own slot marks (``<slot>.sshfwup_state``), which mean the same under every contract.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

from .bootenv import BootEnv, BootState, slot_state_var

log = logging.getLogger(__name__)

__all__ = ["BootContract"]


class BootContract(ABC):
    """A bootloader's contract, spoken over one boot environment.

    Method names are those the server has always called on the environment (``state``,
    ``validate``, ``revert_to``, ``mark_slot``), so the seam replaces the adapter in place.
    """

    name: ClassVar[str]
    #: the variables the bootloader's script reads and writes (sshfwup's own marks are not among them)
    boot_keys: ClassVar[tuple[str, ...]]

    def __init__(self, env: BootEnv, *, health_gated: bool = False) -> None:
        self.env = env
        # Whether the server validates a first boot only after the app proved healthy: a contract
        # whose bootloader validates on its own must say so, since that protection is then void.
        self.health_gated = health_gated

    # --- reading ------------------------------------------------------------------------------

    async def state(self) -> BootState:
        """What the environment says now, interpreted by this contract."""
        return self.interpret(await self.env.read())

    @abstractmethod
    def interpret(self, env: Mapping[str, str]) -> BootState:
        """The boot state of a raw environment: active slot, validated, trial, warnings."""

    # --- changing -----------------------------------------------------------------------------

    def validate_values(self, env: Mapping[str, str]) -> dict[str, str | None]:
        """The variables to write so the firmware that boots next counts as proven: validated,
        and a boot counter, where the environment has one, disarmed (the same under both U-Boot
        contracts; a backend whose bootloader reads other keys overrides this)."""
        values: dict[str, str | None] = {"nerves_fw_validated": "1"}
        if "upgrade_available" in env:
            values["upgrade_available"] = "0"
        if "bootcount" in env:
            values["bootcount"] = "0"
        return values

    @abstractmethod
    def revert_values(self, env: Mapping[str, str], slot: str, *, proven: bool) -> dict[str, str | None]:
        """The variables to write so ``slot`` boots next: as proven firmware, or as a trial the
        bootloader falls back from if it never validates."""

    async def validate(self) -> None:
        """Mark the firmware that boots next good, so the bootloader stops falling back."""
        await self.env.write(self.validate_values(await self.env.read()))

    async def revert_to(self, slot: str, *, proven: bool = True, also: Mapping[str, str | None] | None = None) -> None:
        """Make ``slot`` boot next, in one environment write together with ``also`` (slot marks).

        ``proven``: its firmware already proved itself, so it boots validated. Otherwise it boots
        as a trial and the bootloader falls back if it never validates — the fallback is never
        switched off for an unproven firmware.
        """
        values = self.revert_values(await self.env.read(), slot, proven=proven)
        values.update(also or {})
        await self.env.write(values)

    async def prefer(self, slot: str) -> None:
        """Boot ``slot`` next as proven firmware (it runs now and validated)."""
        await self.revert_to(slot, proven=True)

    async def prevent(self, slot: str, state: str) -> None:
        """Never boot ``slot`` again on sshfwup's account: mark it (ROLLED_BACK or INCOMPLETE)."""
        await self.mark_slot(slot, state)

    def fwup_args(self) -> tuple[str, ...]:
        """What the update's fwup needs beyond ``[fwup] extra_args`` for this contract (where
        ``reboot_param()`` writes, for one): none for the U-Boot contracts."""
        return ()

    async def mark_slot(self, slot: str, state: str | None) -> None:
        """Record ``slot``'s state (INCOMPLETE, ROLLED_BACK, or None: whole): sshfwup's own mark,
        the same under every contract (no bootloader reads it)."""
        await self.env.write({slot_state_var(slot): state})
