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

__all__ = ["confirm_unchanged", "revert", "succeed"]


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
    ctx = UpdateContext(device, uploader, report, after, root, result, head)
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
