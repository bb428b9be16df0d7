"""The simulated U-Boot: which slot boots, and what the boot script writes back to the env.

One decision per boot contract (``[boot] contract``, :mod:`sshfwup.boot.backends`), each the boot
script's as a pure function of the environment, so every branch is testable without a disk:
``choose_boot`` (``uboot-bootcount``, ``deploy/uboot/bootcount/boot.cmd``) and ``choose_nerves``
(``uboot-nerves``, ``deploy/uboot/nerves/boot.cmd``). ``boot`` joins one with
:class:`sshfwup.boot.bootenv.BootEnv` (the same libubootenv adapter the server uses) the way U-Boot
does at power-on: read, decide, save. Each writes only what its real script writes.

The ``uboot-bootcount`` rules (Nerves-style A/B with a boot counter):

- ``nerves_fw_active`` names the slot to boot.
- ``upgrade_available=1`` means that firmware has not validated itself yet. Each such boot
  increments ``bootcount``; once ``bootcount`` exceeds ``bootlimit`` the firmware is given up on:
  the other slot becomes active again and counts as validated.
- ``nerves_fw_booted=1`` is written on every boot.

The ``uboot-nerves`` rules (a Nerves system's ``nerves_init``, e.g. nerves_system_bbb):

- ``nerves_fw_active`` = ``a`` boots slot a; anything else boots slot b (the script's ``else``).
- ``nerves_fw_booted=1`` and ``nerves_fw_validated=0``: the firmware had its trial boot and never
  validated: switch ``nerves_fw_active`` to the other slot, set ``nerves_fw_validated=1``.
- any other ``nerves_fw_booted``: a first boot: set ``nerves_fw_booted=1``, and
  ``nerves_fw_validated=1`` if ``nerves_fw_autovalidate=1``.
- ``upgrade_available``/``bootcount``/``bootlimit`` are not read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from sshfwup.boot.bootenv import BootEnv, BootEnvError, other_slot

log = logging.getLogger(__name__)

__all__ = [
    "FACTORY_ENV",
    "BootChoice",
    "BootEnv",
    "BootEnvError",
    "boot",
    "choose_boot",
    "choose_for",
    "choose_nerves",
    "other_slot",
]

SLOTS = ("a", "b")
DEFAULT_SLOT = "a"
DEFAULT_BOOTLIMIT = 3


@dataclass(frozen=True)
class BootChoice:
    """The boot script's decision: the slot to boot, the env variables to save, and why."""

    slot: str
    updates: dict[str, str] = field(default_factory=dict)
    reason: str = ""


def _int_var(env: Mapping[str, str], name: str, default: int, notes: list[str]) -> int:
    raw = env.get(name)
    if raw is None:
        notes.append(f"{name} not set, using {default}")
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        notes.append(f"{name}={raw!r} is not a number, using {default}")
        return default
    if value < 0:
        notes.append(f"{name}={raw!r} is negative, using {default}")
        return default
    return value


def choose_boot(env: Mapping[str, str]) -> BootChoice:
    """Decide which slot boots from the environment, like the device's U-Boot script."""
    notes: list[str] = []
    updates: dict[str, str] = {}

    active = env.get("nerves_fw_active")
    if active not in SLOTS:
        what = "not set" if active is None else f"{active!r} is not a slot"
        notes.append(f"nerves_fw_active {what}, booting slot {DEFAULT_SLOT}")
        active = DEFAULT_SLOT
        updates["nerves_fw_active"] = active

    upgrade_available = env.get("upgrade_available")
    if upgrade_available is None:
        # Without the flag, an explicitly unvalidated firmware is the best evidence we have.
        unvalidated = env.get("nerves_fw_validated") == "0"
        notes.append(
            "upgrade_available not set, "
            + ("nerves_fw_validated=0 so treating the firmware as unvalidated" if unvalidated else "treating as 0")
        )
    else:
        unvalidated = upgrade_available == "1"

    if unvalidated:
        bootcount = _int_var(env, "bootcount", 0, notes) + 1
        bootlimit = _int_var(env, "bootlimit", DEFAULT_BOOTLIMIT, notes)
        if bootcount > bootlimit:
            fallback = other_slot(active)
            updates.update(
                nerves_fw_active=fallback,
                nerves_fw_validated="1",
                upgrade_available="0",
                bootcount="0",
            )
            reason = (
                f"firmware in slot {active} was not validated within {bootlimit} boot attempts; "
                f"falling back to slot {fallback}"
            )
            active = fallback
        else:
            updates["bootcount"] = str(bootcount)
            reason = f"booting unvalidated firmware in slot {active} (attempt {bootcount} of {bootlimit})"
    else:
        reason = f"booting slot {active}"

    updates["nerves_fw_booted"] = "1"
    if notes:
        reason += " (" + "; ".join(notes) + ")"
    return BootChoice(slot=active, updates=updates, reason=reason)


def choose_nerves(env: Mapping[str, str]) -> BootChoice:
    """Decide like a Nerves system's U-Boot script (``nerves_init``): one trial boot, then fallback."""
    updates: dict[str, str] = {}
    # `if test ${nerves_fw_active} = "a"` ... else: the root is slot b, whatever the value.
    active = "a" if env.get("nerves_fw_active") == "a" else "b"
    if env.get("nerves_fw_booted") == "1":
        if env.get("nerves_fw_validated") == "0":
            fallback = other_slot(active)
            updates.update(nerves_fw_active=fallback, nerves_fw_validated="1")
            reason = (
                f"firmware in slot {active} booted before and was never validated; "
                f"falling back to slot {fallback}"
            )
            active = fallback
        else:
            reason = f"booting slot {active}"
    else:
        updates["nerves_fw_booted"] = "1"
        if env.get("nerves_fw_autovalidate") == "1":
            updates["nerves_fw_validated"] = "1"
            reason = f"first boot of slot {active}; validated by U-Boot (nerves_fw_autovalidate=1)"
        elif env.get("nerves_fw_validated") == "1":
            reason = f"first boot of slot {active}"
        else:
            reason = f"trial boot of unvalidated firmware in slot {active} (falls back at the next boot unless validated)"
    return BootChoice(slot=active, updates=updates, reason=reason)


_DECISIONS = {"uboot-bootcount": choose_boot, "uboot-nerves": choose_nerves}

#: What each contract's U-Boot environment carries from the factory beyond fwup's ``complete``
#: task (a Nerves system's default env; health-gated validation needs autovalidate off).
FACTORY_ENV: dict[str, dict[str, str]] = {
    "uboot-bootcount": {},
    "uboot-nerves": {"nerves_fw_autovalidate": "0"},
    # no boot variables: the Pi-like firmware reads autoboot.txt (sim/tryboot.py)
    "fwup-ops": {},
}


def choose_for(contract: str) -> Callable[[Mapping[str, str]], BootChoice]:
    """The boot script's decision for a ``[boot] contract`` name."""
    try:
        return _DECISIONS[contract]
    except KeyError:
        raise ValueError(f"the simulator has no bootloader for boot contract {contract!r} (known: {', '.join(_DECISIONS)})") from None


def boot(env: BootEnv, contract: str = "uboot-bootcount") -> BootChoice:
    """Power-on: read the env, choose a slot, save the variables that changed."""
    current = env.read_sync()
    choice = choose_for(contract)(current)
    changed = {k: v for k, v in choice.updates.items() if current.get(k) != v}
    env.write_sync(changed)
    log.info("U-Boot: %s", choice.reason)
    return choice
