"""What follows fwup's verdict. A success: the slot is marked whole, the installed firmware is
recorded and the success callback runs (its failure reverts the boot environment). A failure: the
boot environment must still name the slot that was active before, or it is reverted."""

from __future__ import annotations

import logging

from sshfwup.boot.bootenv import INCOMPLETE, ROLLED_BACK, BootEnvError, BootState, other_slot, slot_state_var
from sshfwup.device import Device

from .callbacks import UpdateContext, applied_verdict, call, load_callback
from .fwhead import FirmwareHead
from .fwup import FwupResult
from .installed import forget, record
from .outcome import Outcome, UpdateError, Uploader
from .report import Report

log = logging.getLogger(__name__)

__all__ = ["after_failure", "confirm_unchanged", "refused_before_writing", "revert", "succeed", "what_changed"]


async def confirm_unchanged(
    device: Device, before: BootState | None, root: str | None, unchanged: str = "the device was not changed"
) -> str:
    """After a failed fwup: the boot env must still name the slot that was active before (a fwup
    killed inside on-finish may have got further than its exit status says). ``unchanged``: what
    the uploader is told when it does (the caller knows whether fwup may have written its slot)."""
    try:
        now = await device.boot_state()
    except BootEnvError as e:
        return f"the boot environment cannot be read to confirm nothing changed ({e})"
    if before is not None and now.active == before.active:
        return unchanged
    log.error("fwup failed but the boot env now names slot %s; reverting", now.active)
    return f"fwup had switched the boot env; {await revert(device, root, INCOMPLETE)}"


def refused_before_writing(result: FwupResult, went_on: bool) -> bool:
    """Did fwup refuse before it could write a byte? Its --framing output says so (measured with
    fwup 1.16.0 on deploy/fwup.conf): every refusal is exactly ``PR 0`` then ``ER <text>`` and
    exit status 1 — another platform ("Expecting platform=... and architecture=...", the
    upgrade.wrongplatform task's on-init), an unvalidated firmware ("Please validate the running
    firmware ...", upgrade.unvalidated), an unexpected medium (upgrade.unexpected), no task whose
    requirements are met ("Couldn't find applicable task ..."), an unsigned archive or a bad
    signature with --public-key-file ("Expecting signed firmware archive.", "... fails digital
    signature verification."), not a .fw at all ("Unrecognized archive format"). Nothing of the
    disk changed in any of them. A task that writes runs its on-init first, which announces it
    (``info("Upgrading partition B")``: a ``WN``) and trims the slot, then progress past 0 as the
    resource is written; a failure after that ("ZIP bad CRC", "ZIP decompression failed") comes
    after a ``WN`` and ``PR`` > 0, with blocks of the slot written. So: fwup exited on its own with
    status 1 and an error, having reported nothing but 0 % before it. Killed (a cut upload, a
    hang) is never a refusal, nor is anything else: then the mark stays (the safe side). The
    limit: an fwup.conf whose writing task has no ``info()`` first could fail within its first
    1 % of progress units, after writing, with this same output — keep an ``info()`` first in
    every task that writes (deploy/fwup.conf does)."""
    return result.exit_code == 1 and bool(result.errors) and not result.messages and not went_on


def what_changed(
    target: str | None, root: str | None, before: BootState | None = None, *, wrote: bool = True,
    was_whole: bool | None = None,
) -> str:
    """After fwup was stopped or failed without switching: what the uploader, the device log and
    ``status`` are told. ``target``: the slot marked incomplete for fwup (None: fwup never saw a
    byte, or its mark is back); ``before``: the boot state read before the upload (what the slot
    held); ``wrote``: fwup reported writing (its first message or progress past 0), so blocks of
    the slot are certainly overwritten — otherwise it had the slot's first bytes and counts as
    having overwritten it (the mark is what decides: nothing boots or reverts to it). ``was_whole``:
    the slot held a whole firmware before (None: as ``before`` says)."""
    if target is None:
        return "the device was not changed"
    held = before.slots[target] if before is not None and target in before.slots else None
    if held is not None and held.version:
        slot = f"slot {target} ({held.version})"
        done = "was partly overwritten" if wrote else "was handed to fwup and counts as partly overwritten"
    else:
        slot = f"slot {target} (which held no firmware)"
        done = "was partly written" if wrote else "was handed to fwup and counts as partly written"
    if was_whole is None:
        was_whole = held is not None and held.usable
    if was_whole:  # a whole firmware: revert was possible
        then = "nothing boots it, and revert is no longer possible until a new upload completes"
    else:
        then = "nothing boots it until a new upload completes"
    running = before.version(root) if before is not None and root is not None else None
    still = f"slot {root} ({running})" if running else f"slot {root}"
    return f"{slot} {done} and is marked incomplete: {then}; {still} still runs and boots next"


async def after_failure(
    device: Device, before: BootState | None, root: str | None, target: str | None, result: FwupResult, *, went_on: bool
) -> tuple[str | None, str]:
    """fwup failed. A refusal before it wrote (``refused_before_writing``) gets the target slot's
    mark back as it was, so the boot env is exactly as before the upload (issue 23 item 4: no mark
    without a write); otherwise the mark stays. Returns the slot still marked for this upload
    (None: none) and the words for the uploader, once the boot env is confirmed to name the slot
    that was active."""
    if target is not None and before is not None and refused_before_writing(result, went_on):
        previous = before.slots[target].state
        try:
            await device.bootenv.mark_slot(target, previous)
            log.info("fwup refused before writing slot %s: its mark is back to %s", target, previous or "(unset)")
            target = None
        except BootEnvError as e:  # the mark stays: the safe direction
            log.error("cannot restore slot %s's mark after fwup's refusal: %s", target, e)
    words = what_changed(target, root, before, wrote=went_on or bool(result.messages))
    return target, await confirm_unchanged(device, before, root, words)


async def revert(device: Device, root: str | None, state: str = ROLLED_BACK) -> str:
    """Undo fwup's switch of the boot env: a failed update must leave the old firmware booting,
    and the slot it wrote is marked (``state``) so that nothing reverts to it later."""
    if root is None:
        return "the boot env was left as fwup set it"
    try:
        await device.bootenv.revert_to(root, also={slot_state_var(other_slot(root)): state})
        return f"boot env reverted to slot {root}"
    except BootEnvError as e:
        return f"REVERTING THE BOOT ENV FAILED ({e})"


async def succeed(
    device: Device,
    uploader: Uploader,
    report: Report,
    root: str | None,
    head: FirmwareHead | None,
    result: FwupResult,
    before: BootState | None = None,
) -> tuple[Outcome, BootState | None]:
    """fwup succeeded: the outcome of the success callback, and the boot state after fwup (the
    last one read; None when none could be)."""
    spec = device.config.fwup.success_callback
    seen: BootState | None = None  # the last state read: the journal names its slot even if a later step fails
    try:
        after = seen = await device.boot_state()
        if after.active and after.slots[after.active].state == INCOMPLETE:
            # an fwup.conf that does not unset it in on-finish: the slot is whole now
            await device.bootenv.mark_slot(after.active, None)
            after = seen = await device.boot_state()
    except BootEnvError as e:
        return Outcome(False, f"fwup finished but the boot environment cannot be read: {e}"), seen
    if after.active:
        if head is not None:
            record(device.config.server.data_dir, after.active, head.uuid, head.version, head.resources)
        else:
            forget(device.config.server.data_dir, after.active)
    device.progress.set(stage="applied", to_slot=after.active, to_version=after.version(after.active) if after.active else None)
    ctx = UpdateContext(device, uploader, report, after, root, result, head, before)
    if not spec:
        return Outcome(True, applied_verdict(ctx)), after
    try:
        outcome = await call(load_callback(spec), ctx)
    except Exception as e:
        if not isinstance(e, UpdateError):
            log.exception("success callback %s failed", spec)
        reason = str(e) if isinstance(e, UpdateError) else f"the success callback {spec} failed: {e}"
        return Outcome(False, f"{reason}; {await revert(device, root)}"), after
    if outcome is None:
        return Outcome(True, applied_verdict(ctx)), after
    if not isinstance(outcome, Outcome):
        return Outcome(False, f"the success callback {spec} returned {outcome!r}, not an Outcome; {await revert(device, root)}"), after
    return outcome, after
