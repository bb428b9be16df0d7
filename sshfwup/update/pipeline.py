"""The default success callback: mount → inspect → hot swap or reboot, with rollback.

fwup has written the inactive slot and switched the boot env. From here the device either runs the
new application version from the new slot without a reboot (hot), or reboots into the new
firmware — and whatever goes wrong, the old version keeps serving and the boot env names firmware
that is known to work. Every stage is journaled before it starts (see :mod:`sshfwup.update.journal`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio

from sshfwup.boot.bootenv import INCOMPLETE, ROLLED_BACK, BootEnvError, other_slot, slot_state_var
from sshfwup.device import Device
from sshfwup.firmware.inspect import Policy, Verdict, inspect_slot, with_resources
from .installed import recorded_resources
from . import door
from .lock import DeviceBusy
from sshfwup.boot.slots import SlotError, mount_slot, unmount
from sshfwup.supervisor.errors import SupervisorError, SwapFailed
from sshfwup.supervisor.instance import AppSource
from .update import Outcome, UpdateContext, Uploader

log = logging.getLogger(__name__)

__all__ = ["PipelineError", "listen_drops", "revert", "run", "validate"]


class PipelineError(Exception):
    """An operator command (revert, validate) cannot be done now; the message says why."""


def listen_drops() -> int:
    """Connections the kernel dropped or refused at a full listen queue (system-wide counters).

    The supervisor never closes a listener, so the only way a connection can be refused during a
    swap is a listen-queue overflow; these counters see exactly that.
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return table.get("ListenDrops", 0) + table.get("ListenOverflows", 0)
    return 0



async def run(ctx: UpdateContext) -> Outcome:
    device, report, cfg = ctx.device, ctx.report, ctx.device.config
    t_ok = time.monotonic()
    old = ctx.running_root
    new = ctx.boot.active
    if old is None or new is None or new == old:
        return Outcome(False, f"fwup finished but the boot env names slot {new}, the running slot; nothing to do")
    old_version = ctx.boot.version(old) or "?"
    new_version = ctx.boot.version(new) or "?"
    journal = device.journal
    if journal is not None:
        journal.advance("applied", to_slot=new, to_version=new_version)

    # 1. mount the new slot read-only
    mount_point = device.slot_mount_point(new)
    t = time.monotonic()
    try:
        await mount_slot(cfg.device.slot_device(new), mount_point, fstype=cfg.device.rootfs_type)
    except SlotError as e:
        return await _abandon(ctx, old, new, f"the new firmware in slot {new} cannot be mounted: {e}")
    await report.line(f"sshfwup: mounted slot {new} read-only ({time.monotonic() - t:.2f} s)")
    if journal is not None:
        journal.advance("mounted")

    # 2. inspect: marker + manifest diff (hashes the app files: off the event loop)
    t = time.monotonic()
    verdict: Verdict = await anyio.to_thread.run_sync(
        lambda: inspect_slot(cfg.device.root_mount, mount_point, Policy.from_config(cfg))
    )
    verdict = replace(verdict, old_version=old_version, new_version=new_version)
    if ctx.firmware is not None:
        # Everything the .fw installs counts: a kernel or boot file beside the root filesystem too.
        installed = recorded_resources(cfg.server.data_dir, old, ctx.boot.slots[old].uuid)
        verdict = with_resources(verdict, installed, {n: (size, h) for n, size, h in ctx.firmware.resources})
    if verdict.hot and device.app is None:
        verdict = replace(verdict, hot=False, reasons=("no application is supervised ([app] command is empty)",))
    elif verdict.hot:
        try:
            app = await device.app.state()
        except SupervisorError as e:
            app = {"app": None, "app_down": {"reason": str(e)}}
        if app["app"] is None:
            # The booted firmware's app never started (the supervisor keeps retrying it): there is
            # no version to swap from, and the new one is proved at boot like any firmware.
            down = app.get("app_down")
            why = f"the app is not running ({down['reason']})" if down else "the app is not running"
            verdict = replace(verdict, hot=False, reasons=(f"{why}: nothing to swap; the new firmware starts at boot",))
    changed = sum(1 for c in verdict.changes)
    await report.line(
        f"sshfwup: inspected {old_version} → {new_version}: {verdict.summary()}"
        f" ({changed} changed file{'s' if changed != 1 else ''}, {time.monotonic() - t:.2f} s)"
    )
    if journal is not None:
        journal.advance("inspected", verdict=verdict.summary(), reasons=verdict.reasons)

    # 3a. reboot
    if not verdict.hot:
        await _unmount_quietly(mount_point)
        text = f"{verdict.summary()}; rebooting into {new_version} (slot {new})"
        if journal is not None:
            journal.advance("reboot", verdict=text)
        device.notify_status(f"rebooting into {new_version}")
        return Outcome(True, text, reboot=True, details={"verdict": verdict.to_json()})

    # 3b. hot swap
    assert device.app is not None
    if journal is not None:
        journal.advance("swapping")
    drops_before = listen_drops()
    device.notify_status(f"swapping the app to {new_version}")
    try:
        # The supervisor swaps (it owns the app); should this process die meanwhile, it finishes
        # the swap and records its ending itself (daemon.record_orphaned_swap).
        result = await device.app.swap(
            AppSource(mount_point, new, new_version), report=lambda line: report.line(f"sshfwup: {line}")
        )
    except SwapFailed as e:
        return await _roll_back(ctx, old, new, old_version, new_version, str(e))
    drops = max(0, listen_drops() - drops_before)
    total = time.monotonic() - t_ok
    serving = result.ready_at
    handoff = result.handoff
    handed = f"; {handoff}" if handoff else ""  # "handed over 3 connections, 1.2 KiB of state"
    text = (
        f"hot reload: {old_version} → {new_version} in {total:.1f} s, {drops} connections refused{handed}; "
        f"slot {new} boots next (reboot pending, not yet validated)"
    )
    if journal is not None:
        journal.advance(
            "hot", app_slot=new, app_root=str(mount_point), app_version=new_version, verdict=text
        )
    device.notify_status(f"running {new_version} (hot); reboot pending")
    details = {"verdict": verdict.to_json(), "seconds": round(total, 3), "refused": drops}
    if serving is not None:
        details["ok_to_serving"] = round(serving - t_ok, 3)
    return Outcome(True, text, details=details)


async def _roll_back(ctx: UpdateContext, old: str, new: str, old_version: str, new_version: str, reason: str) -> Outcome:
    device = ctx.device
    await _unmount_quietly(device.slot_mount_point(new))
    reverted = await device.give_up_slot(old, new, new_version)
    text = f"hot reload failed: {reason}; rolled back: {old_version} keeps serving; {reverted}"
    if reverted.startswith("boot env reverted"):
        text += f"; {_overwritten(ctx, new, new_version)}"
    if device.journal is not None:
        device.journal.advance("rolled-back", app_slot=old, app_version=old_version, verdict=text)
    device.notify_status(f"running {old_version}; update rolled back")
    return Outcome(False, text)


def _overwritten(ctx: UpdateContext, slot: str, version: str) -> str:
    """What a rolled-back update cost: the other slot's firmware of before is gone."""
    held = ctx.before.slots[slot] if ctx.before is not None and slot in ctx.before.slots else None
    if held is not None and held.version and held.state is None:
        return (f"slot {slot} held {held.version} before and now holds {version}, marked rolled back: nothing "
                f"boots it, and revert is no longer possible until a new upload completes")
    return f"slot {slot} now holds {version}, marked rolled back: nothing boots it until a new upload completes"


async def _abandon(ctx: UpdateContext, old: str, new: str, reason: str) -> Outcome:
    """Something broke before the swap: the old version never stopped; keep the old firmware."""
    device = ctx.device
    await _unmount_quietly(device.slot_mount_point(new))
    try:
        await device.bootenv.revert_to(old, also={slot_state_var(new): ROLLED_BACK})
        tail = f"boot env reverted to slot {old}"
    except BootEnvError as e:
        tail = f"REVERTING THE BOOT ENV FAILED ({e})"
    text = f"update failed: {reason}; {tail}"
    if device.journal is not None:
        device.journal.advance("rolled-back", verdict=text)
    return Outcome(False, text)


async def _unmount_quietly(mount_point: Path) -> None:
    # The old app was just stopped or the new one killed: give the kernel a moment to drop refs.
    for attempt in range(20):
        try:
            await unmount(mount_point)
            return
        except SlotError as e:
            if attempt == 19:
                log.error("%s stays mounted: %s", mount_point, e)
                return
            await anyio.sleep(0.1)


# --- operator commands ------------------------------------------------------------------------


async def validate(device: Device, who: Uploader) -> str:
    """Mark the running firmware good (what the server does itself after a healthy boot)."""
    async with _through_the_door(device, f"validate requested by {who}"):
        # read under the lock: a change that held it may have just rewritten the boot env
        root = device.running_root()
        boot = await device.boot_state()
        if root is None or boot.active != root:
            raise PipelineError(
                f"slot {boot.active} has not booted yet (the device runs slot {root}); reboot first, then validate"
            )
        version = boot.version(root) or "?"
        if boot.validated:
            return f"firmware {version} in slot {root} is already validated"
        await device.bootenv.validate()
    if device.journal is not None and device.journal.current is not None:
        device.journal.advance("validated")
    log.info("firmware %s validated by %s", version, who)
    return f"validated firmware {version} in slot {root}"


async def revert(device: Device, who: Uploader) -> str:
    """Go back to the previous firmware.

    After a hot swap (reboot pending) that means: the running root's firmware boots next again and
    the app swaps back to it — no reboot. Otherwise the other slot boots next; reboot to run it.
    """
    root = device.running_root()
    if root is None:
        raise PipelineError("cannot tell which slot is running")
    async with _through_the_door(device, f"revert requested by {who}"):
        boot = await device.boot_state()  # under the lock: see validate
        if boot.active is not None and boot.active != root:
            version = boot.version(root) or "?"
            await device.bootenv.revert_to(root)
            app = (await device.app.state())["app"] if device.app is not None else None
            if device.app is not None and app is not None and app["slot"] != root:
                try:
                    await device.app.swap(AppSource(device.config.device.root_mount, root, version))
                except SwapFailed as e:
                    raise PipelineError(f"boot env reverted to slot {root}, but the app could not swap back: {e}") from None
                await _unmount_quietly(device.slot_mount_point(boot.active))
            if device.journal is not None and device.journal.current is not None:
                device.journal.advance("reverted", app_slot=root, app_version=version, verdict=f"reverted by {who}")
            log.warning("reverted to %s in slot %s by %s", version, root, who)
            return f"reverted: slot {root} ({version}) runs and boots next; no reboot needed"
        other = other_slot(root)
        info = boot.slots[other]
        if not info.version:
            raise PipelineError(f"slot {other} holds no firmware to revert to")
        if info.state == INCOMPLETE:
            raise PipelineError(
                f"slot {other} is incomplete: an upload to it was cut or failed after fwup began writing, so "
                f"{info.version} there is no longer whole; revert is not possible until a new upload completes; "
                f"slot {root} ({boot.version(root) or '?'}) keeps running and booting"
            )
        if info.state == ROLLED_BACK:
            raise PipelineError(
                f"slot {other} holds {info.version}, which failed and was rolled back: refusing to revert to it; "
                f"slot {root} keeps booting"
            )
        # Not proven on this boot: it boots unvalidated and must pass the same boot validation,
        # or the bootloader falls back to slot {root}.
        await device.bootenv.revert_to(other, proven=False)
        if device.journal is not None and device.journal.current is not None:
            device.journal.advance("reverted", verdict=f"reverted to slot {other} by {who}")
        log.warning("boot env reverted to slot %s by %s", other, who)
        return (f"slot {other} ({info.version}) boots next, unvalidated until it proves healthy (else the device "
                f"falls back to slot {root}); reboot to run it (ssh <device> reboot)")


@asynccontextmanager
async def _through_the_door(device: Device, who: str) -> AsyncIterator[None]:
    """An operator's command through the device's one door (door.py); busy: a PipelineError."""
    try:
        await door.acquire(device, who)
    except DeviceBusy as e:
        raise PipelineError(str(e)) from None
    try:
        yield
    finally:
        device.lock.release()
