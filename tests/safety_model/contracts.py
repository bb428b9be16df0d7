"""What the update-safety model expects of each boot contract: one entry per contract.

Everything the model checks that depends on the bootloader lives here, written from the
contract's description (docs/deploying.md §6, sshfwup/boot/*'s docstrings, FACTS.md), not read
from sshfwup's or the simulator's code, so a wrong write on either side shows as a difference:

- ``view``: how the contract reads a boot environment — the slot it names, whether it is validated,
  whether the next boot is a trial, and the *forecast*: the slots the next boots run if nothing
  validates (the last one for good). Invariants, the abstract state and the boot checks use it.
- ``validate_keys`` / ``revert_keys`` / ``boot_keys``: the variables ``validate``, ``revert`` and
  the bootloader itself may write (sshfwup's slot marks come on top, the same under every contract).
- ``validated``: the environment after a validation (the device's own, during any event).
- ``factory``: what a freshly made device's environment must hold.
- ``impossible`` / ``edges``: pairs that cannot happen, and planning edges, beyond the common ones.
- ``specific``: the (state, event) pairs where this contract behaves unlike the others; the CI
  sample always walks them.

Adding a contract (e.g. ``fwup-ops``) is one ``ContractSpec`` in ``CONTRACTS``; a contract whose
boot state is not (only) in the U-Boot environment gives its own ``boot_record``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SLOTS = ("a", "b")
MARK = "sshfwup_state"  # <slot>.sshfwup_state: sshfwup's own mark, no bootloader reads it
DEFAULT_BOOTLIMIT = 3  # uboot-bootcount: the script's limit when the env sets none


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


@dataclass(frozen=True)
class BootView:
    """A boot environment as the contract reads it."""

    active: str | None  # the slot the environment names (None: it names none)
    validated: bool
    trial: bool  # the bootloader falls back unless the firmware validates (status's trial_boot)
    forecast: tuple[str, ...]  # the slots the next boots run if nothing validates; the last one for good

    @property
    def next_boot(self) -> str:
        return self.forecast[0]


def _uboot_env(device: Any) -> dict[str, str]:
    return dict(device.env())


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(env.get(name, "").strip())
    except ValueError:
        return default
    return value if value >= 0 else default


def _uboot_validated(env: Mapping[str, str]) -> dict[str, str]:
    """Validation under both U-Boot contracts: validated, and a boot counter (where the env has
    one) disarmed — what Nerves.Runtime writes."""
    after = {**env, "nerves_fw_validated": "1"}
    after.update({k: "0" for k in ("upgrade_available", "bootcount") if k in env})
    return after


def bootcount_view(env: Mapping[str, str]) -> BootView:
    """uboot-bootcount: ``upgrade_available=1`` is a trial; each trial boot counts in
    ``bootcount``; past ``bootlimit`` boots the other slot runs, validated."""
    named = env.get("nerves_fw_active")
    slot = named if named in SLOTS else "a"
    if "upgrade_available" in env:
        trial = env["upgrade_available"] == "1"
    else:
        trial = env.get("nerves_fw_validated") == "0"
    forecast: tuple[str, ...] = (slot,)
    if trial:
        left = _count(env, "bootlimit", DEFAULT_BOOTLIMIT) - _count(env, "bootcount", 0)
        forecast = (slot,) * max(left, 0) + (other(slot),)
    return BootView(named, env.get("nerves_fw_validated") == "1", trial, forecast)


def nerves_view(env: Mapping[str, str]) -> BootView:
    """uboot-nerves: a firmware that booted (``nerves_fw_booted=1``) and is not validated falls back
    at the next boot; a first boot is one trial, or validated by U-Boot itself when
    ``nerves_fw_autovalidate=1``."""
    named = env.get("nerves_fw_active")
    slot = "a" if named == "a" else "b"  # the script's `else` boots b
    validated = env.get("nerves_fw_validated") == "1"
    booted = env.get("nerves_fw_booted") == "1"
    autovalidate = env.get("nerves_fw_autovalidate") == "1"
    if validated or (not booted and autovalidate):
        return BootView(named, validated, False, (slot,))
    if booted:  # it had its trial boot: the next boot is the other slot
        return BootView(named, validated, True, (other(slot),))
    return BootView(named, validated, True, (slot, other(slot)))


def nerves_warns(env: Mapping[str, str]) -> bool:
    """With autovalidate on, health-gated validation protects nothing: status must say so."""
    return env.get("nerves_fw_autovalidate") == "1"


@dataclass(frozen=True)
class ContractSpec:
    """One boot contract's expectations (see the module's docstring)."""

    name: str
    view: Callable[[Mapping[str, str]], BootView]
    validate_keys: frozenset[str]
    revert_keys: frozenset[str]
    boot_keys: frozenset[str]
    validated: Callable[[Mapping[str, str]], dict[str, str]] = _uboot_validated
    warns: Callable[[Mapping[str, str]], bool] = lambda env: False
    factory: Mapping[str, str] = field(default_factory=dict)
    boot_record: Callable[[Any], dict[str, str]] = _uboot_env
    impossible: Mapping[tuple[str, str], str] = field(default_factory=dict)
    edges: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    specific: tuple[tuple[str, str], ...] = ()
    note: str = ""

    def config(self) -> dict[str, Any]:
        """The device configuration's part that picks this contract."""
        return {"boot": {"contract": self.name}}


_VALIDATE_KEYS = frozenset({"nerves_fw_validated", "upgrade_available", "bootcount"})

UBOOT_BOOTCOUNT = ContractSpec(
    name="uboot-bootcount",
    view=bootcount_view,
    validate_keys=_VALIDATE_KEYS,
    revert_keys=frozenset({"nerves_fw_active", "nerves_fw_validated", "upgrade_available", "bootcount"}),
    boot_keys=frozenset({"nerves_fw_active", "nerves_fw_validated", "upgrade_available", "bootcount",
                         "nerves_fw_booted"}),  # fmt: skip
    specific=(
        ("settled/unvalidated/other-whole", "reboot"),  # a trial boot counts, the same slot boots again
        ("settled/unvalidated/other-whole", "power-cut"),
        ("settled/validated/other-whole", "revert"),  # unproven revert: the counter armed
        ("pending/unvalidated/other-whole", "reboot"),
    ),
    note="a trial firmware boots up to bootlimit (3) times, then the other slot",
)

UBOOT_NERVES = ContractSpec(
    name="uboot-nerves",
    view=nerves_view,
    validate_keys=_VALIDATE_KEYS,
    # an unproven revert is a first boot again: nerves_fw_booted=0, or the script undoes it at once
    revert_keys=frozenset({"nerves_fw_active", "nerves_fw_validated", "nerves_fw_booted", "upgrade_available",
                           "bootcount"}),  # fmt: skip
    boot_keys=frozenset({"nerves_fw_active", "nerves_fw_validated", "nerves_fw_booted"}),
    warns=nerves_warns,
    factory={"nerves_fw_autovalidate": "0"},  # health-gated validation needs U-Boot not to validate
    specific=(
        ("settled/unvalidated/other-whole", "reboot"),  # the trial was used: the next boot falls back
        ("settled/unvalidated/other-whole", "power-cut"),
        ("settled/validated/other-whole", "revert"),  # unproven revert: must reset nerves_fw_booted
        ("settled/unvalidated/other-whole", "revert"),
        ("pending/unvalidated/other-whole", "reboot"),  # a first boot: runs once, on trial
    ),
    note="a trial firmware boots once; unvalidated after that boot, the next boot is the other slot",
)

CONTRACTS: dict[str, ContractSpec] = {spec.name: spec for spec in (UBOOT_BOOTCOUNT, UBOOT_NERVES)}
DEFAULT_CONTRACT = UBOOT_BOOTCOUNT.name


def contract(name: str) -> ContractSpec:
    try:
        return CONTRACTS[name]
    except KeyError:
        raise ValueError(f"the model has no boot contract {name!r} (known: {', '.join(CONTRACTS)})") from None
