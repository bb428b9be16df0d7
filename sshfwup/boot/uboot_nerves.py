"""The contract of a Nerves system's U-Boot script (BeagleBone-style ``nerves_init``).

What that script does at every boot (read from nerves_system_bbb's ``uboot.env``; the simulator's
``sshfwup.sim.bootloader.choose_nerves`` plays it):

- ``nerves_fw_booted=1`` (this firmware booted before) and ``nerves_fw_validated=0``: it never
  validated, so the script switches ``nerves_fw_active`` to the other slot and sets
  ``nerves_fw_validated=1`` — one trial boot, then fallback.
- otherwise, on a first boot (``nerves_fw_booted`` not 1): it sets ``nerves_fw_booted=1`` and, if
  ``nerves_fw_autovalidate=1``, ``nerves_fw_validated=1`` — the bootloader validates the new
  firmware before any application ran. Nerves ships that default; with it sshfwup's
  health-gated validation protects nothing, which this backend reports loudly.

fwup's ``upgrade`` on-finish writes ``nerves_fw_active=NEW``, ``nerves_fw_validated=0``,
``nerves_fw_booted=0``. sshfwup writes what Nerves.Runtime writes, so the script keeps the choice:
validate → ``nerves_fw_validated=1`` (and ``upgrade_available=0``, ``bootcount=0`` where present);
a proven revert → ``nerves_fw_active=SLOT``, ``nerves_fw_validated=1`` (the ``revert`` task of
Nerves' ops archive); an unproven revert → ``nerves_fw_active=SLOT``, ``nerves_fw_validated=0``
and ``nerves_fw_booted=0`` — a first boot again, so the script gives it one trial and falls back.
Writing ``nerves_fw_validated=0`` alone would leave ``nerves_fw_booted=1`` and the script would
undo the revert at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .bootenv import BootState
from .contract import BootContract

log = logging.getLogger(__name__)

__all__ = ["AUTOVALIDATE_WARNING", "UBootNerves"]

AUTOVALIDATE_WARNING = (
    "nerves_fw_autovalidate=1 in the boot environment: U-Boot validates new firmware at its first boot, "
    "before sshfwup's health check runs, so health-gated validation protects nothing and a broken "
    "firmware is never fallen back from. Set it to 0 (fw_setenv nerves_fw_autovalidate 0, or in the "
    "system's U-Boot environment) to let sshfwup decide."
)


class UBootNerves(BootContract):
    name = "uboot-nerves"
    boot_keys = (
        "nerves_fw_active",
        "nerves_fw_validated",
        "nerves_fw_booted",
        "nerves_fw_autovalidate",
        "upgrade_available",
        "bootcount",
    )

    def interpret(self, env: Mapping[str, str]) -> BootState:
        active = env.get("nerves_fw_active")
        validated = env.get("nerves_fw_validated") == "1"
        autovalidate = env.get("nerves_fw_autovalidate") == "1"
        first_boot = env.get("nerves_fw_booted") != "1"
        # An unvalidated firmware is on trial unless the script will validate it at its first boot.
        trial = not validated and not (first_boot and autovalidate)
        warnings = (AUTOVALIDATE_WARNING,) if autovalidate and self.health_gated else ()
        return BootState(
            active if active in ("a", "b") else None,
            validated,
            BootState.slot_infos(env),
            dict(env),
            trial=trial,
            contract=self.name,
            warnings=warnings,
        )

    def revert_values(self, env: Mapping[str, str], slot: str, *, proven: bool) -> dict[str, str | None]:
        values: dict[str, str | None] = {"nerves_fw_active": slot}
        if proven:
            values["nerves_fw_validated"] = "1"
        else:
            # A first boot again: the script boots it once and falls back unless it validates.
            values["nerves_fw_validated"] = "0"
            values["nerves_fw_booted"] = "0"
            if env.get("nerves_fw_autovalidate") == "1":
                log.warning("reverting to unproven slot %s, but %s", slot, AUTOVALIDATE_WARNING)
        if "upgrade_available" in env:
            values["upgrade_available"] = "0" if proven else "1"
        if "bootcount" in env:
            values["bootcount"] = "0"
        return values
