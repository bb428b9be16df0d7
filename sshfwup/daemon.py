"""``sshfwup serve``: the supervisor process, start to finish.

``sshfwup serve`` is two processes. This one, the supervisor, is long-lived and faces no network
client: it owns the app (its sockets, instances, swaps and rollbacks), boot validation, the
journal's recovery and the log ring. The SSH front (``sshfwup/ssh/front.py``: asyncssh, uploads,
fwup) is its child, restarted at once when it dies (``supervisor/front_process.py``); the two speak
over a local socket (``supervisor/control.py``). The front's death costs the app nothing: the
update it cut is settled here (:func:`_settle_after_front`) the way a cut upload ends.

Order matters:
1. recover whatever a crash or power loss left (journal + boot env + mount table);
2. start the application (from the running root, or from the mounted new slot after a hot swap);
3. bind the SSH port and start the front on it; tell the service manager READY=1;
4. on an unvalidated first boot, validate the firmware once the app stayed healthy for the
   observation window — or fall back to the other slot and reboot.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path

import anyio
import anyio.abc

from .app import notify
from sshfwup.boot.bootenv import INCOMPLETE, ROLLED_BACK, BootEnvError, BootState, other_slot, slot_state_var
from .config import Config
from .device import Device
from sshfwup.update.journal import ACTIVE_STAGES, FAILED_STAGES, Journal, Recovery, StageHook, plan_recovery
from sshfwup.update import door
from sshfwup.update.lock import DeviceBusy
from sshfwup.system.ports import ListenError, bind_ssh, describe_holders, port_holders
from sshfwup.boot.slots import SlotError, is_mounted, mount_slot, mounts, unmount
from sshfwup.supervisor.control import ControlServer, OrphanedSwap
from sshfwup.supervisor.front_process import FrontExit, FrontProcess
from sshfwup.supervisor.supervisor import AppNotReady, AppSource, Instance, Supervisor, SupervisorError

log = logging.getLogger(__name__)

# How long a crash-loop rollback waits for the update lock; if it stays busy, the crashing
# version is restarted and the rollback is tried again at its next crash.
_CRASH_LOOP_LOCK_WAIT = 30.0

# bind() errors that no restart fixes by itself: the address is taken, not ours, or not allowed.
_BIND_ERRNOS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)

__all__ = ["DaemonError", "front_command", "run_daemon"]


class DaemonError(Exception):
    """``sshfwup serve`` cannot run as configured; the message says what to fix."""



def front_command(config: Config) -> list[str]:
    """How the supervisor starts the SSH front: this install's ``sshfwup serve``, same config."""
    if config.source is None:
        raise DaemonError("the configuration has no file to hand to the SSH front (load it with --config)")
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    return [sys.executable, "-m", "sshfwup", "--log-level", level, "serve", "--config", str(config.source)]


async def run_daemon(
    config: Config,
    *,
    on_stage: StageHook | None = None,  # tests' fault injection (see journal.StageHook)
    front: Sequence[str] | None = None,  # the front's command (tests: one with a fault of its own)
) -> None:
    device = Device(config)
    device.journal = Journal(config.server.data_dir, on_stage=on_stage)
    _running_root(device)  # before any task group, so a wrong [device] setting reads as one message
    command = list(front) if front is not None else front_command(config)
    # Every log line (the app's output and the front's too) also goes to `ssh device logs`.
    root_logger = logging.getLogger()
    root_logger.addHandler(device.logs)
    try:
        await _serve(device, command)
    finally:
        root_logger.removeHandler(device.logs)


async def _serve(device: Device, command: list[str]) -> None:
    config = device.config
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_unmount_slots, config.server.run_dir)  # runs last: the app is gone by then
        tg = await stack.enter_async_context(anyio.create_task_group())
        plan = await _recover(device)
        app_ok = True
        if config.app.command:
            supervisor = Supervisor(
                config.app, marker=f"sshfwup:{config.server.data_dir}",
                on_crash_loop=functools.partial(_roll_back_crash_loop, device),
            )  # fmt: skip
            try:
                device.supervisor = await stack.enter_async_context(supervisor)
            except SupervisorError as e:
                raise _listen_error(e, config) or e
            app_ok = await _start_app(device, plan, tg)
        # Bound here, not in the front: they stay open while a front restarts, so a client
        # connecting meanwhile waits in the backlog instead of being refused.
        listeners = bind_ssh(config.server.listen, config.server.port)
        for sock in listeners:
            stack.callback(sock.close)
        port = listeners[0].getsockname()[1]
        control = ControlServer(device, on_orphaned_swap=functools.partial(_record_orphaned_swap, device))
        front = FrontProcess(command, listeners, control, hang_timeout=config.server.front_hang_timeout,
                             on_exit=functools.partial(_settle_after_front, device))  # fmt: skip
        tg.start_soon(front.run, tg)
        tg.start_soon(_reboot_when_requested, device)
        if plan.reboot:
            device.request_reboot(plan.message)
        else:
            tg.start_soon(_validate_after_boot, device, app_ok)
        tg.start_soon(_watchdog)
        log.info("SSH on %s:%d: the SSH front serves it (a process of its own)", config.server.listen or "*", port)
        notify(f"READY=1\nSTATUS=listening on port {port}")
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                break
        notify("STOPPING=1")
        await _stop_app(device)
        tg.cancel_scope.cancel()


async def _reboot_when_requested(device: Device) -> None:
    """A reboot the supervisor decided (a failed first boot, a reboot that never happened)."""
    request = await device.wait_reboot_request()
    await anyio.sleep(device.config.device.reboot_delay)
    log.warning("rebooting: %s", request.reason)
    await device.reboot()


def _listen_error(error: SupervisorError, config: Config) -> ListenError | None:
    """The app's sockets could not be bound because an address is taken or not allowed: a
    ListenError naming who holds the port (``sshfwup serve`` exits with its own status for it);
    None for any other supervisor error."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__
    if not isinstance(cause, OSError) or cause.errno not in _BIND_ERRNOS:
        return None
    holders = [
        f"port {spec.port} {describe_holders(spec.port)}"
        for spec in config.app.sockets
        if spec.kind == "tcp" and cause.errno == errno.EADDRINUSE and port_holders(spec.port)
    ]
    return ListenError("; ".join([f"{error} ([app] sockets)", *holders]))


async def _stop_app(device: Device) -> None:
    """Stop the app the polite way (SIGTERM, drain) *before* the task group is cancelled: a
    cancelled supervisor can only SIGKILL (an app that drains and exits would be recorded as
    killed, and its in-flight requests lost)."""
    sup = device.supervisor
    if sup is None:
        return
    with anyio.move_on_after(device.config.app.drain_timeout + 10):
        await sup.stop()


def _running_root(device: Device) -> str:
    root = device.running_root()
    if root is None:
        slots = ", ".join(f"{slot} = {path}" for slot, path in device.config.device.slots)
        raise DaemonError(
            f"cannot tell which slot is running: neither slot ({slots}) is mounted at "
            f"{device.config.device.root_mount} ([device] slots and root_mount must name the running root's "
            f"block device and where it is mounted; see the mount table, /proc/self/mountinfo)"
        )
    return root


async def _recover(device: Device) -> Recovery:
    """Bring the device back to a consistent state before anything else runs."""
    root = _running_root(device)
    try:
        boot: BootState | None = await device.boot_state()
    except BootEnvError as e:
        log.error("boot env unreadable: %s; starting without recovery", e)
        boot = None
    assert device.journal is not None
    written = None
    if boot is not None and boot.slots[other_slot(root)].state == INCOMPLETE:
        # The mark is the interrupted upload's own (a refusal puts it back): the slot held a
        # whole firmware before it if it names one.
        written = _what_changed(other_slot(root), root, boot)
    plan = plan_recovery(device.journal.current, running_root=root, active=boot.active if boot else None,
                         written=written)  # fmt: skip
    log.info("start-up: running slot %s, boot env names slot %s; %s", root, boot.active if boot else "?", plan.message)
    log.info("boot contract: %s", device.bootenv.name)
    for warning in boot.warnings if boot else ():
        log.warning("BOOT CONTRACT WARNING: %s", warning)
    # Mounts of new slots left by a crashed run: none is in use (the app died with the server).
    keep = device.slot_mount_point(plan.app_slot) if plan.mount_app_slot else None
    for m in mounts():
        p = Path(m.mount_point)
        if p.parent == device.config.server.run_dir / "slots" and p != keep:
            try:
                await unmount(p)
            except SlotError as e:
                log.error("stale mount %s cannot be removed: %s", p, e)
    if plan.revert_to is not None:
        await device.bootenv.revert_to(plan.revert_to)
    if plan.give_up is not None:
        try:
            await device.bootenv.prevent(plan.give_up, ROLLED_BACK)
        except BootEnvError as e:
            log.error("cannot mark slot %s rolled back: %s", plan.give_up, e)
    if plan.stage is not None and device.journal.current is not None:
        device.journal.advance(plan.stage, verdict=plan.message)
    if device.journal.current is not None:
        rec = device.journal.current
        device.last_outcome = {"ok": rec.stage not in FAILED_STAGES, "verdict": rec.verdict}
    return plan


async def _start_app(device: Device, plan: Recovery, tg: anyio.abc.TaskGroup) -> bool:
    """Start the app where the plan says; fall back to the running root if that fails."""
    sup = device.supervisor
    assert sup is not None
    root = device.running_root()
    assert root is not None
    try:
        boot: BootState | None = await device.boot_state()
    except BootEnvError as e:
        # The app (and SSH, to fix this) must come up anyway: run what the running root holds.
        log.error("the boot env is unreadable (%s): starting the app from the running root", e)
        boot, plan = None, Recovery(root, False)
    source = await _source(device, plan.app_slot, boot)
    try:
        await sup.start(source)
        device.notify_status(f"app {source.version} ready")
        return True
    except AppNotReady as e:
        log.error("the app did not start: %s", e.reason)
        if source.slot != root:
            # The hot-swapped version no longer starts: go back to the firmware we booted.
            if device.config.app.revert_on_failure:
                try:
                    await device.bootenv.revert_to(root, also={slot_state_var(source.slot): ROLLED_BACK})
                except BootEnvError as e:
                    log.error("cannot revert the boot env to slot %s: %s", root, e)
            if device.journal is not None and device.journal.current is not None:
                device.journal.advance("rolled-back", verdict=f"{source.version} failed after a restart: {e.reason}")
            await _unmount_quietly(device.slot_mount_point(source.slot))
            return await _start_app(device, plan=Recovery(root, False), tg=tg)
    # Keep trying in the background: the SSH server must come up regardless, so a fixed
    # firmware can always be uploaded.
    tg.start_soon(_retry_start, device, source)
    return False


async def _source(device: Device, slot: str, boot: BootState | None) -> AppSource:
    version = (boot.version(slot) if boot is not None else None) or "unknown"
    if slot == device.running_root():
        return AppSource(device.config.device.root_mount, slot, version)
    mount_point = device.slot_mount_point(slot)
    await mount_slot(device.config.device.slot_device(slot), mount_point, fstype=device.config.device.rootfs_type)
    return AppSource(mount_point, slot, version)


async def _retry_start(device: Device, source: AppSource) -> None:
    sup = device.supervisor
    assert sup is not None
    first, maximum = device.config.app.restart_backoff
    delay = max(first, 0.1)
    while True:
        await anyio.sleep(delay)
        try:
            await sup.start(source)
            log.info("the app started after all (%s)", source.version)
            return
        except AppNotReady as e:
            log.error("the app still does not start: %s (next try in %.0f s)", e.reason, min(delay * 2, maximum))
        except SupervisorError as e:
            log.error("the app cannot be started: %s", e)
            return
        delay = min(delay * 2, maximum)


async def _validate_after_boot(device: Device, app_ok: bool) -> None:
    """Validate a first boot of new firmware only after the app proved healthy; else fall back."""
    root = device.running_root()
    try:
        boot = await device.boot_state()
    except BootEnvError as e:
        log.error("cannot read the boot env to validate: %s", e)
        return
    if root is None or boot.active != root or boot.validated:
        return
    version = boot.version(root) or "?"
    sup = device.supervisor
    problem: str | None = None if app_ok else "the app did not start"
    if sup is not None and problem is None:
        problem = await sup.watch_health(device.config.app.observe)
    async with _update_lock(device, f"boot validation of {version}"):
        # An operator may have reverted or validated during the observation window: decide on
        # the env as it is now, never on the one read before it.
        try:
            now = await device.boot_state()
        except BootEnvError as e:
            now = None
            log.error("cannot read the boot env after observing %s: %s", version, e)
        if now is not None and (now.active != root or now.validated):
            log.info("not validating %s: the boot env now names slot %s%s", version, now.active,
                     " (validated)" if now.validated else "")  # fmt: skip
            return
        if sup is not None and problem is None and now is not None:
            # Healthy for the observation window is not enough: it must be healthy now, when the
            # bootloader's fallback is switched off (the lock may have been waited for).
            problem = await sup.check_health()
        if problem is None and now is not None:
            # Said before the write, so a power cut between the two leaves a trace of the attempt.
            log.info("validating firmware %s in slot %s: its app is healthy", version, root)
            await device.bootenv.validate()
            rec = device.journal.current if device.journal is not None else None
            if rec is not None and rec.stage == "fell-back" and rec.from_slot == root:
                # The old firmware proving itself again after a fallback: the last update still
                # did not take, and status must keep saying so.
                log.info("firmware %s in slot %s validated again after the fallback", version, root)
                device.notify_status(f"firmware {version} validated")
                return
            if device.journal is not None and device.journal.current is not None:
                device.journal.advance("validated", verdict=f"firmware {version} validated after a healthy boot")
            device.last_outcome = {"ok": True, "verdict": f"firmware {version} validated after a healthy boot"}
            device.notify_status(f"firmware {version} validated")
            log.info("validated firmware %s in slot %s", version, root)
            return
        other = other_slot(root)
        reason = f"firmware {version} failed its first boot ({problem or 'the boot env could not be read'})"
        fallback = now.slots[other] if now is not None else None
        if fallback is not None and fallback.usable:
            log.error("%s; falling back to slot %s (%s)", reason, other, fallback.version)
            try:
                await device.bootenv.revert_to(other, also={slot_state_var(root): ROLLED_BACK})
            except BootEnvError as e:
                # The bootloader's boot counter falls back on its own after enough failed boots.
                log.error("cannot write the boot env (%s); rebooting so the bootloader falls back", e)
            if device.journal is not None and device.journal.current is not None:
                device.journal.advance("rolled-back", verdict=f"{reason}; fell back to slot {other}")
            device.request_reboot(f"{reason}; falling back to slot {other}")
        elif now is None:
            device.request_reboot(f"{reason}; the boot env is unreadable: rebooting so the bootloader falls back")
        else:
            log.error("%s, and slot %s holds no usable firmware to fall back to; staying up", reason, other)


async def _roll_back_crash_loop(device: Device, crashed: Instance, crashes: int) -> AppSource | None:
    """The supervisor's crash-loop handler: a hot-swapped version (running from the other slot,
    reboot pending) that keeps crashing gives way to the firmware the device booted. The boot env
    goes back to the running root with the failed slot marked rolled back ([app]
    revert_on_failure), the journal records ``rolled-back``, and the app starts from the running
    root. The booted firmware itself has nothing to go back to without a reboot: None, it keeps
    being restarted."""
    root = device.running_root()
    slot = crashed.source.slot
    if root is None or slot == root:
        return None
    try:
        who = f"rollback of {crashed.version} after {crashes} crashes"
        async with _update_lock(device, who, timeout=_CRASH_LOOP_LOCK_WAIT):
            current = device.supervisor.current if device.supervisor is not None else None
            if current is None or current.pid != crashed.pid:
                return None  # an operator's revert (or an update) took over while we waited for the lock
            try:
                boot: BootState | None = await device.boot_state()
            except BootEnvError as e:
                boot = None
                log.error("cannot read the boot env: %s", e)
            version = (boot.version(root) if boot else None) or "unknown"
            env = await device.give_up_slot(root, slot, crashed.version)
            text = (
                f"{crashed.version} from slot {slot} failed {crashes} times in a row after its hot swap"
                f" (last: it {crashed.describe_exit()}); rolled back: {version} runs from slot {root} again; {env}"
            )
            log.error("%s", text)
            if device.journal is not None and device.journal.current is not None:
                root_mount = device.config.device.root_mount
                device.journal.advance(
                    "rolled-back", app_slot=root, app_root=str(root_mount), app_version=version, verdict=text
                )
            device.last_outcome = {"ok": False, "verdict": text}
            device.notify_status(f"running {version}; {crashed.version} rolled back after {crashes} crashes")
            await _unmount_quietly(device.slot_mount_point(slot), attempts=20)  # its processes are all gone
            return AppSource(device.config.device.root_mount, root, version)
    except DeviceBusy as e:
        log.warning("cannot roll back %s now (%s); restarting it meanwhile", crashed.version, e)
        return None


async def _record_orphaned_swap(device: Device, orphan: OrphanedSwap) -> None:
    """A swap ended after the front that asked for it died: record the ending it could not. Runs
    while the supervisor still holds the front's update lock (see control.py)."""
    journal = device.journal
    rec = journal.current if journal is not None else None
    if journal is None or rec is None or rec.stage not in ("swapping", "observing") or rec.to_slot != orphan.source.slot:
        return
    new, version = orphan.source.slot, orphan.source.version
    old = rec.from_slot or device.running_root() or other_slot(new)
    if orphan.swapped:
        text = (f"hot reload: {rec.from_version or '?'} → {version}; the SSH front died during the swap, so the "
                f"uploader was not told; slot {new} boots next (reboot pending, not yet validated)")
        journal.advance("hot", app_slot=new, app_root=str(orphan.source.root), app_version=version, verdict=text)
        device.last_outcome = {"ok": True, "verdict": text}
        device.notify_status(f"running {version} (hot); reboot pending")
    else:
        await _unmount_quietly(device.slot_mount_point(new), attempts=20)
        env = await device.give_up_slot(old, new, version)
        text = (f"hot reload failed: {orphan.error}; rolled back: {rec.from_version or '?'} keeps serving; {env} "
                f"(the SSH front died during the swap, so the uploader was not told)")
        journal.advance("rolled-back", app_slot=old, app_version=rec.from_version, verdict=text)
        device.last_outcome = {"ok": False, "verdict": text}
    log.warning("%s", text)


async def _settle_after_front(device: Device, ended: FrontExit) -> None:
    """The SSH front died. If it left an update midway, end it as a cut upload ends: before fwup's
    verdict nothing is switched (the boot env goes back where it was, a slot fwup began on stays
    marked incomplete); once fwup had applied the firmware the update is complete, for the next
    boot (reboot pending; no hot swap without an uploader to tell). A swap in progress holds the
    front's lock until it has recorded its own ending, so this waits for it. The app is not touched."""
    journal = device.journal
    rec = journal.current if journal is not None else None
    if journal is None or rec is None or rec.stage not in ACTIVE_STAGES:
        return
    cause = f"the SSH front {ended.describe()}"
    try:
        async with _update_lock(device, f"settling the update the SSH front left at '{rec.stage}'"):
            now = journal.current
            if now is None or now.id != rec.id or now.stage not in ACTIVE_STAGES:
                return  # ended meanwhile (a swap's own record), or a new upload began
            root = device.running_root()
            if root is None:
                return
            try:
                boot: BootState | None = await device.boot_state()
            except BootEnvError as e:
                log.error("cannot read the boot env to settle the cut update: %s", e)
                boot = None
            if now.stage == "receiving":
                written = None
                other = other_slot(root)
                if boot is not None and boot.slots[other].state == INCOMPLETE:
                    written = _what_changed(other, root, boot)
                plan = plan_recovery(now, running_root=root, active=boot.active if boot else None, written=written)
                if plan.revert_to is not None:
                    await device.bootenv.revert_to(plan.revert_to)
                text = f"{cause} during the upload: {plan.message}"
                journal.advance(plan.stage or "interrupted", verdict=text)
                ok = False
            elif now.stage in ("applied", "mounted", "inspected"):
                await _unmount_quietly(device.slot_mount_point(now.to_slot or other_slot(root)), attempts=20)
                text = (f"{cause} after fwup had applied {now.to_version or 'the new firmware'} (at stage "
                        f"'{now.stage}'): it is installed in slot {now.to_slot} and boots next (reboot pending, "
                        f"on trial until it validates); {now.from_version or 'the old version'} keeps running")
                journal.advance("installed", verdict=text)
                ok = True
            else:  # swapping, observing: the swap ended, its front died before it recorded how
                sup = device.supervisor
                current = sup.current if sup is not None else None
                if current is not None and current.source.slot == now.to_slot:
                    await _record_orphaned_swap(device, OrphanedSwap(current.source, True))
                else:
                    slot = now.to_slot or other_slot(root)
                    source = AppSource(device.slot_mount_point(slot), slot, now.to_version or "?")
                    await _record_orphaned_swap(device, OrphanedSwap(source, False, "it did not take over"))
                return
            device.last_outcome = {"ok": ok, "verdict": text}
            log.warning("%s", text)
    except DeviceBusy as e:
        log.error("cannot settle the update the SSH front left at '%s': %s", rec.stage, e)


def _what_changed(slot: str, root: str, boot: BootState) -> str:
    """What an interrupted upload left in ``slot`` (marked incomplete; it held a whole firmware
    before if it names one). Imported here only: after_fwup brings the upload path (fwup's
    framing and the like), which the supervisor needs only after an upload was cut."""
    from sshfwup.update.after_fwup import what_changed

    return what_changed(slot, root, boot, wrote=False, was_whole=bool(boot.version(slot)))


def _update_lock(device: Device, who: str, timeout: float = 600) -> AbstractAsyncContextManager[None]:
    """The device's own work through the one door (door.py): it waits for any holder (an upload
    or an operator command) up to ``timeout``, and is held as brief: an upload arriving meanwhile
    waits instead of failing."""
    return door.state_change(device, who, own_work=True, wait=timeout)


async def _watchdog() -> None:
    """WATCHDOG=1 at half the interval systemd asked for (WatchdogSec=)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return
    interval = int(usec) / 2e6
    while True:
        notify("WATCHDOG=1")
        await anyio.sleep(interval)


async def _unmount_quietly(mount_point: Path, *, attempts: int = 1) -> None:
    for attempt in range(attempts, 0, -1):
        try:
            await unmount(mount_point)
            return
        except SlotError as e:
            if attempt == 1:
                log.error("%s", e)
                return
        await anyio.sleep(0.1)  # a process that just exited: the kernel drops its references


async def _unmount_slots(run_dir: Path) -> None:
    with anyio.CancelScope(shield=True):
        for m in mounts():
            p = Path(m.mount_point)
            if p.parent == run_dir / "slots" and is_mounted(p):
                await _unmount_quietly(p)
