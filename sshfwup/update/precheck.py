"""May this update go ahead? Decided before fwup writes a byte: from the device's state
(``precheck``) and from what the upload says it is (``judge_head``)."""

from __future__ import annotations

from dataclasses import dataclass

from sshfwup.boot.bootenv import BootState, SlotInfo, other_slot
from sshfwup.boot.slots import SlotError, is_mounted, unmount
from sshfwup.device import Device

from .callbacks import UpdateContext, call, load_callback
from .fwhead import FirmwareHead, version_key
from .outcome import UpdateError, UpdateRefused, Uploader
from .report import Report

__all__ = ["HeadJudgement", "judge_head", "precheck"]


async def precheck(device: Device, uploader: Uploader, report: Report, before: BootState, root: str | None) -> None:
    """Refuse (``UpdateRefused``) an update the device cannot take now: it cannot tell which slot
    runs, a reboot is pending, the running firmware is not validated yet, the slot fwup would write
    is still in use, or the configured precheck callback says no."""
    if root is None:
        raise UpdateRefused(
            f"cannot tell which slot is running: nothing from [device] slots is mounted at {device.config.device.root_mount}"
        )
    if before.active is not None and before.active != root:
        version = before.version(before.active) or "new firmware"
        raise UpdateRefused(
            f"a reboot is pending: slot {before.active} ({version}) is installed and boots next, but the device "
            f"still runs slot {root}; another update now would overwrite the root filesystem in use. "
            f"Reboot first (ssh <device> reboot), then upload again"
        )
    if before.active == root and not before.validated:
        # The other slot is this firmware's fallback until it validates: never write it now
        # (fwup's upgrade tasks refuse too, but only after the upload started).
        raise UpdateRefused(
            f"the running firmware {before.version(root) or '?'} (slot {root}) is not validated yet, and slot "
            f"{other_slot(root)} is its fallback; wait until it proves healthy (it validates itself) or run "
            f"`ssh <device> validate`, then upload again"
        )
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


@dataclass(frozen=True)
class HeadJudgement:
    """What the upload's head means for the running firmware."""

    downgrade: bool = False  # older than the running version, and allowed
    unchanged: str | None = None  # the verdict when it is the running firmware: nothing to do
    # Why it is refused: UpdateError for a downgrade the config does not allow, UpdateRefused
    # for a delta patch made for another firmware than the running one.
    refusal: UpdateError | None = None


def judge_head(head: FirmwareHead, running: SlotInfo, root: str, *, allow_downgrade: bool) -> HeadJudgement:
    """The same firmware as the one running needs no update at all; an older one is a downgrade,
    refused unless ``[update] allow_downgrade``; a delta patch made for another firmware than the
    running one is refused."""
    downgrade = False
    if (running.version and head.version and version_key(head.version) < version_key(running.version)
            and running.uuid != head.uuid):  # fmt: skip
        if not allow_downgrade:
            reason = (f"update refused: {head.version} is older than the running {running.version} (a downgrade); "
                      f"set [update] allow_downgrade = true on the device to allow it; the device was not changed")
            return HeadJudgement(refusal=UpdateError(reason))
        downgrade = True
    if running.uuid and running.uuid == head.uuid:
        return HeadJudgement(downgrade, unchanged=f"already running {head.version} (uuid {head.uuid}); nothing changed")
    source = head.delta_source
    if source is not None and source.uuid != running.uuid:
        # fwup would find out only at the end, after rewriting the whole slot from the wrong source
        runs = f"{running.version or 'a firmware'} (uuid {running.uuid})" if running.uuid else (
            f"{running.version or 'a firmware'} whose uuid is not recorded ({root}.nerves_fw_uuid unset)")
        reason = (
            f"this upload is a delta patch to {head.version} for firmware {source}, but the device runs "
            f"{runs} in slot {root}; send the full .fw, or a patch made from the firmware the device runs; "
            "the device was not changed"
        )
        return HeadJudgement(downgrade, refusal=UpdateRefused(reason))
    return HeadJudgement(downgrade)
