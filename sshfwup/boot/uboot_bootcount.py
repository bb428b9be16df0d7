"""The classic U-Boot contract: ``upgrade_available``, ``bootcount``, ``bootlimit``.

The default, and what the simulator's bootloader and the QEMU device's boot script
(``deploy/uboot/bootcount/boot.cmd``) implement:

- ``nerves_fw_active`` (a | b) names the slot to boot.
- ``upgrade_available=1``: that firmware has not validated itself yet. The boot script counts
  each such boot in ``bootcount``; past ``bootlimit`` it boots the other slot, validated.
- ``nerves_fw_validated`` mirrors the verdict for tools that read Nerves' name (fwup.conf's
  ``upgrade`` tasks require it).

sshfwup writes: validate → ``nerves_fw_validated=1`` and, where present, ``upgrade_available=0``,
``bootcount=0`` (what nerves_runtime writes). Revert → ``nerves_fw_active=SLOT`` with
``nerves_fw_validated=1`` (proven) or ``0`` plus ``upgrade_available=1`` and ``bootcount=0``
(a trial the boot counter falls back from).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .bootenv import BootState
from .contract import BootContract

__all__ = ["UBootBootcount"]


class UBootBootcount(BootContract):
    name = "uboot-bootcount"
    boot_keys = ("nerves_fw_active", "nerves_fw_validated", "upgrade_available", "bootcount", "bootlimit")

    def interpret(self, env: Mapping[str, str]) -> BootState:
        state = BootState.from_env(env)
        if "upgrade_available" in env:
            trial = env["upgrade_available"] == "1"
        else:
            # Without the flag the boot script treats an explicitly unvalidated firmware as a trial.
            trial = env.get("nerves_fw_validated") == "0"
        return replace(state, trial=trial, contract=self.name)

    def revert_values(self, env: Mapping[str, str], slot: str, *, proven: bool) -> dict[str, str | None]:
        values: dict[str, str | None] = {"nerves_fw_active": slot, "nerves_fw_validated": "1" if proven else "0"}
        # An unproven firmware needs the counter armed, present or not: it is what falls back.
        if "upgrade_available" in env or not proven:
            values["upgrade_available"] = "0" if proven else "1"
        if "bootcount" in env:
            values["bootcount"] = "0"
        return values
