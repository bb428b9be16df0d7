"""May this update go ahead? Decided before fwup writes a byte: from the device's state
(``precheck``) and from what the upload says it is (``judge_head``). The rules themselves are
pure functions in :mod:`.rules`, which ``sshfwup firmware diff --running`` applies too."""

from __future__ import annotations

from sshfwup.boot.bootenv import BootState, other_slot
from sshfwup.boot.slots import SlotError, is_mounted, unmount
from sshfwup.device import Device

from .callbacks import UpdateContext, call, load_callback
from .outcome import UpdateRefused, Uploader
from .report import Report
from .rules import state_refusal

__all__ = ["precheck"]


async def precheck(device: Device, uploader: Uploader, report: Report, before: BootState, root: str | None) -> None:
    """Refuse (``UpdateRefused``) an update the device cannot take now: it cannot tell which slot
    runs, a reboot is pending, the running firmware is not validated yet, the slot fwup would write
    is still in use, or the configured precheck callback says no."""
    refused = state_refusal(before, root, root_mount=str(device.config.device.root_mount))
    if refused is not None:
        raise UpdateRefused(refused)
    assert root is not None
    # fwup targets the slot that is not active; never let that be a mounted filesystem
    target = other_slot(before.active or root)
    stale = device.config.server.run_dir / "slots" / target
    if is_mounted(stale):
        try:
            await unmount(stale)
        except SlotError as e:
            raise UpdateRefused(f"slot {target} is still in use ({e}); reboot the device first") from None
    spec = device.config.fwup.precheck_callback
    if spec:
        ctx = UpdateContext(device, uploader, report, before, root)
        try:
            verdict = await call(load_callback(spec), ctx)
        except UpdateRefused:
            raise
        except Exception as e:
            raise UpdateRefused(f"precheck failed: {e}") from None
        if verdict not in (None, True):
            raise UpdateRefused(f"precheck refused the update: {verdict}")
