"""What an event may change: the common rules, and the boot contract's (tests/model/contracts.py).

Common to every contract: a refusal, or a failure before fwup wrote, changes nothing; a failure
while fwup wrote changes only its target slot and that slot's mark; ``revert`` succeeds exactly
when a reboot is pending or the other slot holds a whole firmware; "not changed" in a message is
true. The contract's: ``validate`` and ``revert`` write only the contract's variables and leave the
environment reading as the contract says (a validated firmware boots for good; an unproven revert
boots its slot at least once, on trial, then falls back to the running slot); a reboot boots the
slot the contract's forecast names and writes only what the bootloader and sshfwup's start-up may.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .contracts import MARK, SLOTS, other
from .device import ALLOWED_REFUSALS, ModelledDevice, ModelViolation, Snapshot

# Words of a message that claims nothing changed (sshfwup's verdicts and journal lines).
NOT_CHANGED = ("the device was not changed", "nothing changed", "nothing was changed")
# Refusals that come before anything is written (sshfwup's prechecks, fwup's own refusals as
# measured with fwup 1.16: see sshfwup/update/update.py): after one of these nothing may change.
REFUSALS = (
    *ALLOWED_REFUSALS, "Expecting platform=", "Unrecognized archive format", "Please validate the running firmware",
    "Couldn't find applicable task", "Expecting signed firmware", "fails digital signature", "is older than the running",
    "the device is busy:",
)  # fmt: skip
_UPLOADING = ("bad-upload", "cut-upload", "slow-tail", "hot-upload", "reboot-upload")
# The server's line when it validated a first boot on its own (sshfwup/daemon.py); with the
# machine's line for each boot (the device's BOOT_LINE), their order in the console says whether
# the device validated before it went down.
_SELF_VALIDATED = "sshfwup.daemon: validated firmware"
_SELF_VALIDATING = "sshfwup.daemon: validating firmware"


@dataclass
class Result:
    """What the uploader or operator saw: exit status (None: no command) and text."""

    code: int | None
    text: str = ""


def validated_before_boot(console: str, boot_line: re.Pattern[str]) -> bool:
    """The device validated its running firmware on its own before it (next) went down."""
    return _before_boot(console, _SELF_VALIDATED, boot_line)


def validating_before_boot(console: str, boot_line: re.Pattern[str]) -> bool:
    """The device began to validate its running firmware before it (next) went down: a power cut
    may have come before or after the environment write."""
    return _before_boot(console, _SELF_VALIDATING, boot_line)


def _before_boot(console: str, line: str, boot_line: re.Pattern[str]) -> bool:
    at = console.find(line)
    boot = boot_line.search(console)
    return at >= 0 and (boot is None or at < boot.start())


def _marks() -> set[str]:
    return {f"{s}.{MARK}" for s in SLOTS}


def self_validation(dev: ModelledDevice, before: Snapshot, after: Snapshot) -> tuple[str, ...]:
    """The keys the device's own validation of a first boot wrote meanwhile (0 -> 1), or (). A
    validation the device began meanwhile counts too, finished or not: the after-snapshot may
    read its writes half done (fwup-ops' validate task writes the reboot parameter before the
    env's nerves_fw_validated=1)."""
    began = _SELF_VALIDATING in dev.console()[before.console_at:]
    if not dev.spec.view(before.env).validated and (dev.spec.view(after.env).validated or began):
        return tuple(sorted(dev.spec.validate_keys))
    return ()


def rolled_back_by_itself(dev: ModelledDevice, before: Snapshot, after: Snapshot) -> tuple[str, ...]:
    """A hot-swapped app that crashed rollback_after_crashes times is swapped back by the device
    itself, whenever that happens (the env goes back to the running slot, which is validated; the
    crashed slot is marked rolled-back): the keys that changed, or ()."""
    running = before.status["running_root"]
    gone = other(running)
    if (before.status["pending_reboot"] and dev.spec.view(after.env).active == running
            and after.env.get(f"{gone}.{MARK}") == "rolled-back" and dev.spec.view(after.env).validated):  # fmt: skip
        return (*sorted(dev.spec.revert_keys | dev.spec.validate_keys), f"{gone}.{MARK}", "app")
    return ()


def check_change(dev: ModelledDevice, event: str, state: str, before: Snapshot, after: Snapshot, result: Result) -> None:
    """What ``event`` (fired in abstract ``state``) changed is what it may change."""
    where = f"\ncontract: {dev.spec.name}\nevent: {event} in state {state}\nexit status: {result.code}\n" \
            f"output: {result.text.strip()[-600:]}\nenv before: {before.env}\nenv after: {after.env}\n" \
            f"last steps: {dev.log[-8:]}"  # fmt: skip
    # the device validating its own first boot meanwhile is not the event's doing
    ignore = self_validation(dev, before, after)
    validated_meanwhile = bool(ignore) or validated_before_boot(dev.console()[before.console_at:], dev.BOOT_LINE)
    if event == "reboot" or (event == "power-cut" and not state.startswith("settled/validated")
                             and not validated_meanwhile):  # fmt: skip
        # (a power cut during an upload that was refused before it wrote: the env is the one
        # before the event, so the boot is the contract's to predict as after a reboot. If the
        # device validated itself before the upload came — its log says so — the upload ran and
        # the cut met it anywhere: as in settled/validated, only the invariants at rest judge
        # that boot. Under fwup-ops the upload's own nerves_fw_validated=0 hides that validation
        # from the record, hence the log.)
        check_reboot(dev, before, after, where, power_cut=event == "power-cut")
    # ... nor is its rollback of a hot-swapped app that kept crashing
    ignore = rolled_back_by_itself(dev, before, after) or ignore
    if before.app[0] in dev.firmwares.crashing:
        ignore = (*ignore, "app")  # a crashing app's restarts are not the event's doing
    changed = before.changes(after, ignore=ignore)
    text = result.text
    if result.code is None:
        return
    if any(w in text for w in NOT_CHANGED) and changed:
        raise ModelViolation(f"{event}: the message says nothing changed, but: {'; '.join(changed)}{where}")
    refused = result.code != 0 and any(r in text for r in REFUSALS)
    if event == "revert":
        check_revert(dev, before, after, result, where)
        refused = result.code != 0
    if event == "validate":
        refused = result.code != 0 or "already validated" in text
        if not refused:
            check_validate(dev, before, after, where)
    if event == "same-upload" and result.code == 0:
        refused = True  # "already running": nothing to do
    if refused:
        if changed:
            raise ModelViolation(f"{event} was refused but changed: {'; '.join(changed)}{where}")
        return
    if result.code != 0 and event.startswith(_UPLOADING):
        # a failure while fwup may have written: only its target slot and that slot's mark
        running = before.status["running_root"]
        target = other(dev.spec.view(before.env).active or running)
        allowed = {f"slot {target} bytes"}
        for line in changed:
            if line in allowed:
                continue
            if line.startswith(f"env {target}.{MARK}:") and line.endswith("-> 'incomplete'"):
                continue
            raise ModelViolation(f"{event} failed and changed more than slot {target} and its mark: {line}{where}")
        if f"slot {target} bytes" in changed and after.env.get(f"{target}.{MARK}") != "incomplete":
            raise ModelViolation(f"{event} wrote slot {target} but left it unmarked{where}")


def _only(keys: set[str], allowed: frozenset[str] | set[str], what: str, where: str) -> None:
    extra = sorted(keys - set(allowed))
    if extra:
        raise ModelViolation(f"{what} wrote {', '.join(extra)}, which the contract does not let it write "
                             f"(it may write {', '.join(sorted(allowed))}){where}")  # fmt: skip


def check_validate(dev: ModelledDevice, before: Snapshot, after: Snapshot, where: str) -> None:
    """A validation writes the contract's validation variables only, and the running firmware then
    boots for good."""
    spec, running = dev.spec, before.status["running_root"]
    _only(before.changed_keys(after), spec.validate_keys, "validate", where)
    view = spec.view(after.env)
    if not view.validated or view.trial or view.forecast != (running,):
        raise ModelViolation(f"after validate the {spec.name} bootloader would boot {view.forecast} "
                             f"(validated={view.validated}, trial={view.trial}), not slot {running} for good{where}")  # fmt: skip


def check_revert(dev: ModelledDevice, before: Snapshot, after: Snapshot, result: Result, where: str) -> None:
    """``revert`` succeeds exactly when it has a whole firmware to go back to; then it writes only
    the contract's variables and marks, and the bootloader boots what the revert promised: the
    running firmware for good (a pending reboot undone), or the other slot on trial with the
    running slot as its fallback (an unproven firmware is never made to boot for good)."""
    spec = dev.spec
    running = before.status["running_root"]
    there = other(running)
    settled = not before.status["pending_reboot"]
    whole = bool(before.env.get(f"{there}.nerves_fw_version")) and not before.env.get(f"{there}.{MARK}")
    if (result.code == 0) != (not settled or whole):
        raise ModelViolation(f"revert {'succeeded' if result.code == 0 else 'was refused'}, but slot {there} "
                             f"{'holds' if whole else 'does not hold'} a whole firmware{where}")  # fmt: skip
    if result.code != 0:
        return
    _only(before.changed_keys(after) - _marks(), spec.revert_keys | spec.validate_keys, "revert", where)
    view = spec.view(after.env)
    if not settled:
        if view.active != running or not view.validated or view.forecast != (running,):
            raise ModelViolation(f"revert of a pending reboot: the {spec.name} bootloader would boot {view.forecast} "
                                 f"(validated={view.validated}), not the running slot {running} for good{where}")  # fmt: skip
        return
    if (view.active != there or view.validated or not view.trial or view.forecast[0] != there
            or view.forecast[-1] != running):  # fmt: skip
        raise ModelViolation(f"revert to the unproven slot {there}: the {spec.name} bootloader would boot "
                             f"{' then '.join(view.forecast)} (validated={view.validated}, trial={view.trial}); the "
                             f"contract wants slot {there} on trial, then slot {running} if it never validates{where}")  # fmt: skip


def check_reboot(dev: ModelledDevice, before: Snapshot, after: Snapshot, where: str, *, power_cut: bool = False) -> None:
    """A reboot boots the slot the contract's forecast names (read from the env before it — after a
    power cut, from what of it survives; if the device validated its first boot before it went
    down, from the env after that), writes only the bootloader's variables, sshfwup's start-up
    recovery and marks, and no slot's bytes."""
    spec = dev.spec
    booted = after.status["running_root"]
    found = spec.power_lost(before.env) if power_cut else dict(before.env)
    expected = spec.view(found).next_boot
    console = dev.console()[before.console_at:]
    allowed = {expected}
    if validated_before_boot(console, dev.BOOT_LINE):
        expected = spec.view(spec.validated(found)).next_boot
        allowed = {expected}
    elif validating_before_boot(console, dev.BOOT_LINE):  # cut between "validating" and the write: either is right
        allowed.add(spec.view(spec.validated(found)).next_boot)
    # (a second boot, the device's own start-up recovery, is not this prediction's business)
    if after.boots == before.boots + 1 and booted not in allowed:
        raise ModelViolation(f"the {spec.name} bootloader booted slot {booted}; from the env before the reboot the "
                             f"contract boots slot {expected} (forecast {spec.view(found).forecast}){where}")  # fmt: skip
    _only(before.changed_keys(after) - _marks(), spec.boot_keys | spec.validate_keys | spec.revert_keys, "a reboot",
          where)  # fmt: skip
    written = [s for s in sorted(before.slots) if before.slots[s] != after.slots.get(s)]
    if written:
        raise ModelViolation(f"a reboot changed the bytes of slot {', '.join(written)}{where}")
    # Once up, the firmware runs validated or on trial, never neither: nothing would fall back
    # from it, and every upload is refused. (Checked on the record the moment the device is
    # ready, before any first-boot validation could mend it: fwup-ops' fallback after a power
    # cut lost the one-shot tryboot ran "not validated" until then.)
    view = spec.view(after.env)
    if spec.fallback_validated and not view.validated and not view.trial:
        raise ModelViolation(f"after the boot slot {booted} runs neither validated nor on trial (the {spec.name} "
                             f"record reads validated={view.validated}, trial={view.trial}){where}")  # fmt: skip
