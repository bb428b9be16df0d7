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
- ``power_lost``: the record as the bootloader finds it after a power cut instead of a restart
  (the same, unless part of it lives in RAM: fwup-ops' one-shot reboot parameter).
- ``factory``: what a freshly made device's environment must hold.
- ``impossible`` / ``edges``: pairs that cannot happen, and planning edges, beyond the common ones.
- ``specific``: the (state, event) pairs where this contract behaves unlike the others; the CI
  sample always walks them.

Adding a contract is one ``ContractSpec`` in ``CONTRACTS``; a contract whose boot state is not
(only) in the U-Boot environment gives its own ``boot_record`` (``fwup-ops``: autoboot.txt, the
one-shot reboot parameter and the mounted root beside fwup's metadata), and a contract whose
devices need their own fwup.conf and ops archive names its example ``layout`` (deploy/examples/).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
    power_lost: Callable[[Mapping[str, str]], dict[str, str]] = dict
    # the firmware a fallback boots runs validated at once (False: it proves itself again first)
    fallback_validated: bool = True
    warns: Callable[[Mapping[str, str]], bool] = lambda env: False
    factory: Mapping[str, str] = field(default_factory=dict)
    boot_record: Callable[[Any], dict[str, str]] = _uboot_env
    impossible: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # states met only in passing (state -> why): no event of the model leads into them for long
    # enough to plan a walk there, so they are not wanted; reaching one is no surprise either
    transient: Mapping[str, str] = field(default_factory=dict)
    edges: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    specific: tuple[tuple[str, str], ...] = ()
    note: str = ""
    layout: str | None = None  # the example layout (deploy/examples/NAME) its devices are made from

    def config(self) -> dict[str, Any]:
        """The device configuration's part that picks this contract."""
        if self.layout is not None:
            return {"boot": dict(example_layout(self.layout).boot)}
        return {"boot": {"contract": self.name}}

    def fwup_conf(self) -> Path | None:
        """The fwup.conf every firmware of this contract's devices is built with (None: the simulator's)."""
        return example_layout(self.layout).fwup_conf if self.layout is not None else None

    def ops_conf(self) -> Path | None:
        """The system's ops archive's source, built into the device (None: the contract needs none)."""
        return example_layout(self.layout).ops_conf if self.layout is not None else None


def example_layout(name: str) -> Any:
    from sshfwup.sim.layouts import find_layout

    return find_layout(name)


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

# --- fwup-ops: a Raspberry-Pi-like tryboot system (deploy/examples/tryboot-like) --------------------
#
# No boot variables: the firmware boots the partition autoboot.txt's [all] section names, or, when
# the restart carries the one-shot parameter "tryboot" (fwup's reboot_param(), a file that a restart
# uses up) and [all] says tryboot_a_b=1, the [tryboot] section's partition, once. Every change is a
# task of the system's ops archive (deploy/examples/tryboot-like/ops.conf): validate.X writes
# autoboot-X (X by default), nerves_fw_validated=1 and the parameter "0"; tryboot.X keeps the running
# slot the default, nerves_fw_validated=0 and the parameter "0 tryboot"; revert.X is validate.X for
# the other, proven slot; prevent-revert.X removes X's platform metadata. fwup's upgrade writes what
# tryboot.X writes. The record the model compares is fwup's metadata environment (slot metadata,
# nerves_fw_validated, sshfwup's marks) plus these pseudo-keys:
AUTOBOOT_ALL = "autoboot.txt[all]"  # the slot that boots by default
AUTOBOOT_TRYBOOT = "autoboot.txt[tryboot]"  # the slot a tryboot restart boots (absent: tryboot_a_b is not 1)
REBOOT_PARAM = "reboot-param"  # what the next restart hands to the firmware (absent: nothing)
RUNNING = "mounted-root"  # the slot mounted at / (the mount table): a trial is "running is not the default"
_PARTITION_SLOTS = {2: "a", 3: "b"}  # the layout's MBR: p2 root A, p3 root B (sshfwup.toml's [device])


def parse_autoboot(text: str) -> dict[str, str]:
    """autoboot.txt as the record's pseudo-keys: [all]'s slot, and [tryboot]'s when tryboot_a_b=1."""
    sections: dict[str, dict[str, str]] = {}
    current = "all"
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif "=" in line:
            key, _, value = line.partition("=")
            sections.setdefault(current, {})[key.strip()] = value.strip()

    def slot(section: str) -> str | None:
        value = sections.get(section, {}).get("boot_partition", "")
        return _PARTITION_SLOTS.get(int(value)) if value.isdigit() else None

    out = {AUTOBOOT_ALL: slot("all") or "none"}
    if sections.get("all", {}).get("tryboot_a_b") == "1" and slot("tryboot"):
        out[AUTOBOOT_TRYBOOT] = slot("tryboot") or "none"
    return out


def _tryboot_record(device: Any) -> dict[str, str]:
    """fwup's metadata env, autoboot.txt (read with mtools from the FAT partition, as the firmware
    reads it), the pending reboot parameter and the mounted root."""
    import subprocess

    from sshfwup.sim.tryboot import mbr_partitions

    record = dict(device.env())
    disk = device.disk
    first = mbr_partitions(disk)[1]
    text = subprocess.run(["mtype", "-i", f"{disk}@@{first * 512}", "::autoboot.txt"], capture_output=True,
                          timeout=10, check=True).stdout.decode(errors="replace")  # fmt: skip
    record.update(parse_autoboot(text))
    try:
        param = (device.path / "reboot-param").read_text(errors="replace").strip()
    except FileNotFoundError:
        param = ""
    if param:
        record[REBOOT_PARAM] = param
    running = device.running_slot()
    if running:
        record[RUNNING] = running
    return record


def tryboot_view(record: Mapping[str, str]) -> BootView:
    """fwup-ops on the tryboot layout: a pending "tryboot" boots [tryboot]'s slot once, then [all]'s;
    a trial runs while the mounted root is not the default and nothing validated it (validate makes
    it the default). ``active`` is what status calls the next boot's slot: the trial slot while one
    is pending or running."""
    default = record.get(AUTOBOOT_ALL)
    default = default if default in SLOTS else None
    running = record.get(RUNNING) or default
    flag = record.get("nerves_fw_validated")
    tryboot = record.get(AUTOBOOT_TRYBOOT)
    if default is None:
        return BootView(None, flag != "0", False, (running or "a",))
    if tryboot in SLOTS and "tryboot" in record.get(REBOOT_PARAM, "").split():
        return BootView(tryboot, False, True, (tryboot, default))
    if running != default:
        if flag == "1":  # a proven revert to the default waits for the restart
            return BootView(default, True, False, (default,))
        return BootView(running, False, True, (default,))  # this boot is the trial; the next is the default
    return BootView(default, flag != "0", False, (default,))


def _tryboot_validated(record: Mapping[str, str]) -> dict[str, str]:
    """validate.X for the running slot X: X by default, validated, an ordinary next restart."""
    running = record.get(RUNNING) or record.get(AUTOBOOT_ALL) or "a"
    return {**record, "nerves_fw_validated": "1", AUTOBOOT_ALL: running, AUTOBOOT_TRYBOOT: other(running),
            REBOOT_PARAM: "0"}  # fmt: skip


_TRYBOOT_KEYS = frozenset({"nerves_fw_validated", AUTOBOOT_ALL, AUTOBOOT_TRYBOOT, REBOOT_PARAM})
# prevent-revert.X (sshfwup's start-up recovery after a fallback, or a rollback) removes X's metadata
_PREVENT_KEYS = frozenset(f"{s}.nerves_fw_{k}" for s in SLOTS for k in ("platform", "architecture"))

FWUP_OPS = ContractSpec(
    name="fwup-ops",
    view=tryboot_view,
    validate_keys=_TRYBOOT_KEYS,
    revert_keys=_TRYBOOT_KEYS,
    # a restart uses up the parameter and mounts another root; start-up recovery may prevent
    boot_keys=frozenset({REBOOT_PARAM, RUNNING}) | _PREVENT_KEYS,
    validated=_tryboot_validated,
    # the parameter is handed over by an orderly restart (and /run is RAM): a power cut loses it,
    # and the firmware boots autoboot.txt's default
    power_lost=lambda record: {k: v for k, v in record.items() if k != REBOOT_PARAM},
    boot_record=_tryboot_record,
    layout="tryboot-like",
    # nothing writes the fallback: the upload's nerves_fw_validated=0 stays, and the default slot
    # proves itself again in its observation window (tests/boot/test_layouts_sim.py relies on it;
    # reported in bench/README.md: uploads are refused meanwhile and the verdict turns to "ok")
    fallback_validated=False,
    # The same ten states are impossible as under the U-Boot contracts, for tryboot's reasons. No
    # event is impossible in a reachable state: the model's events are uploads, power cuts,
    # reboots, validate and revert, none of them a bootloader variable of its own (no bootcount).
    transient={
        "settled/unvalidated/other-rolled-back": (
            "after a fallback the default slot runs unvalidated beside the rolled-back slot only until its "
            "first-boot validation (the observation window): random steps meet it, the walk cannot plan into it"),
    },
    impossible={
        **{(f"settled/unvalidated/other-{o}", "*"): (
            "an unvalidated firmware runs only as a tryboot trial: fwup's upgrade.X needs "
            "nerves_fw_validated=1 and sshfwup writes no slot while unvalidated, so the default slot it "
            "came from stays whole")
           for o in ("empty", "incomplete")},
        **{(f"pending/validated/other-{o}", "*"): (
            "pending with validated=1 is only a proven revert.X waiting for the restart, and sshfwup's revert "
            "is proven only towards the running slot (validate.X): from a trial it tries the other slot "
            "(tryboot.X sets nerves_fw_validated=0)")
           for o in ("empty", "whole", "incomplete", "rolled-back")},
        **{(f"pending/unvalidated/other-{o}", "*"): (
            "pending means a 'tryboot' parameter for the slot that is not running, written only by fwup's "
            "upgrade (which just made that slot whole) or tryboot.X (which refuses a slot without its metadata)")
           for o in ("empty", "incomplete", "rolled-back")},
    },
    specific=(
        ("pending/unvalidated/other-whole", "reboot"),  # the restart uses up "tryboot": the new slot once
        ("pending/unvalidated/other-whole", "power-cut"),
        ("settled/unvalidated/other-whole", "reboot"),  # no parameter left: autoboot.txt's default again
        ("settled/unvalidated/other-whole", "power-cut"),
        ("settled/unvalidated/other-whole", "validate"),  # validate.X makes the trial slot the default
        ("settled/validated/other-whole", "revert"),  # unproven revert: tryboot.X, the running slot stays default
        ("settled/unvalidated/other-whole", "revert"),
        ("pending/unvalidated/other-whole", "revert"),  # undo before the restart: validate.X of the running slot
    ),
    note="a new firmware boots once (tryboot); unvalidated, the next restart boots autoboot.txt's default",
)

CONTRACTS: dict[str, ContractSpec] = {spec.name: spec for spec in (UBOOT_BOOTCOUNT, UBOOT_NERVES, FWUP_OPS)}
DEFAULT_CONTRACT = UBOOT_BOOTCOUNT.name


def contract(name: str) -> ContractSpec:
    try:
        return CONTRACTS[name]
    except KeyError:
        raise ValueError(f"the model has no boot contract {name!r} (known: {', '.join(CONTRACTS)})") from None
