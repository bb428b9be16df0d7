"""One firmware update, independent of how the bytes arrive (ssh -s, sftp, scp, upload client).

    async with Update(device, uploader, report) as update:   # lock + precheck + start fwup
        await update.write(chunk) ...                         # backpressure from fwup's pipe
        outcome = await update.finish()                       # genuine EOF → fwup result → callback

fwup commits as soon as it reads the archive's central directory, so the last bytes of the
upload are held back (:mod:`.holdback`) until the transport saw a genuine end and the archive's
end record checks out. Leaving the block without ``finish()`` (disconnect, error, cancellation)
kills fwup, which then never saw the central directory: a cut upload never switches the boot
environment. Once fwup reports success, the update succeeded, whatever the pipe does next.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio

from sshfwup.boot.bootenv import INCOMPLETE, ROLLED_BACK, BootEnvError, BootState, other_slot, slot_state_var
from sshfwup.device import Device
from .fwup import FwupError, FwupProcess, FwupResult, Progress
from .fwhead import MAX_HEAD, FirmwareHead, read_head_bytes, version_key
from .holdback import Holdback, IncompleteArchive, check_end, check_start
from .installed import forget, record
from .lock import DeviceBusy
from .report import Report
from sshfwup.boot.slots import SlotError, is_mounted, unmount

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "Outcome",
    "Update",
    "UpdateContext",
    "UpdateError",
    "UpdateRefused",
    "Uploader",
    "load_callback",
]

EXIT_OK = 0
EXIT_FAILED = 1
BRIEF_HOLDER_WAIT = 15.0  # s: the longest an upload waits for the device's own brief work to release the lock


class UpdateError(Exception):
    """The update failed; the message is for the uploader."""


class UpdateRefused(UpdateError):
    """Refused before a byte reached fwup: nothing on the device changed."""


@dataclass(frozen=True)
class Uploader:
    user: str
    fingerprint: str
    peer: str
    transport: str

    def __str__(self) -> str:
        return f"{self.user}@{self.peer} key {self.fingerprint} via {self.transport}"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    verdict: str
    reboot: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        return EXIT_OK if self.ok else EXIT_FAILED


@dataclass(frozen=True)
class UpdateContext:
    """What a precheck or success callback gets."""

    device: Device
    uploader: Uploader
    report: Report
    boot: BootState  # before the update (precheck) / after fwup (success callback)
    running_root: str | None
    fwup: FwupResult | None = None
    firmware: FirmwareHead | None = None  # what the upload said it is (its meta.conf), if readable


Callback = Callable[[UpdateContext], Any]


#: Callbacks by the names they had before sshfwup's modules moved into packages (issue 21):
#: configurations written then keep working.
MOVED_CALLBACK_MODULES = {"sshfwup.pipeline": "sshfwup.update.pipeline", "sshfwup.update": "sshfwup.update.update"}


def load_callback(spec: str) -> Callback:
    """``"package.module:function"`` or ``"/path/to/file.py:function"`` → the function (sync or async)."""
    module_name, _, attr = spec.rpartition(":")
    module_name = MOVED_CALLBACK_MODULES.get(module_name, module_name)
    try:
        if module_name.endswith(".py"):
            # A plain file on the device: no package to install for a one-off hook.
            loader_spec = importlib.util.spec_from_file_location(f"sshfwup_callback_{abs(hash(module_name))}", module_name)
            if loader_spec is None or loader_spec.loader is None:
                raise ImportError(f"cannot load {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError, OSError, SyntaxError) as e:
        raise UpdateError(f"callback {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise UpdateError(f"callback {spec!r} is not callable")
    return fn


async def call(fn: Callback, ctx: UpdateContext) -> Any:
    result = fn(ctx)
    if inspect.isawaitable(result):
        result = await result
    return result


class Update:
    def __init__(self, device: Device, uploader: Uploader, report: Report) -> None:
        self.device = device
        self.uploader = uploader
        self.report = report
        self.received = 0
        self.started = time.monotonic()
        self._fwup: FwupProcess | None = None
        self._stack = AsyncExitStack()
        self._finished = False
        self._aborted: str | None = None
        self.before: BootState | None = None
        self.after: BootState | None = None
        self.root: str | None = None
        self._relayed = anyio.Event()
        self._holdback = Holdback()
        self._start = b""  # the first bytes, until the zip signature is checked
        self._applied: FwupResult | None = None  # fwup succeeded before the upload ended
        self.head: FirmwareHead | None = None  # what the upload says it is (meta.conf)
        self._head_read = False  # decided: head read, or left to fwup
        self._head_bytes = bytearray()  # the upload's first bytes until the head is decided
        self._skip: Outcome | None = None  # nothing to do (already running it): discard the rest
        self._target: str | None = None  # the slot fwup writes, once it may have started
        self.downgrade = False  # an older version than the running one, allowed by the config

    # --- lifecycle -------------------------------------------------------------------------

    async def _take_lock(self) -> None:
        """One update at a time: refused at once while another update holds the lock, but the
        device's own brief work under it (boot validation right after a boot) is waited for —
        an uploader must not be told "another update is in progress" by the device itself."""
        deadline = anyio.current_time() + BRIEF_HOLDER_WAIT
        while True:
            try:
                self.device.lock.acquire(str(self.uploader))
                return
            except DeviceBusy as e:
                if e.holder is None or not e.holder.brief or anyio.current_time() > deadline:
                    log.warning("refused upload from %s: %s", self.uploader, e)
                    raise UpdateRefused(str(e)) from None
                log.info("upload from %s waits for %s", self.uploader, e.holder.who)
            await anyio.sleep(0.1)

    async def __aenter__(self) -> "Update":
        cfg = self.device.config
        await self._take_lock()
        # Unwinds in reverse: relay task → fwup (killed unless finished) → lock.
        stack = AsyncExitStack()
        stack.callback(self.device.lock.release)
        try:
            await self._precheck()
            journal = self.device.journal
            if journal is not None and self.before is not None and self.root is not None:
                journal.begin(
                    uploader=str(self.uploader), from_slot=self.root, from_version=self.before.version(self.root)
                )
            from_version = self.before.version(self.root) if self.before is not None and self.root else None
            self.device.progress.begin(self.uploader, from_slot=self.root, from_version=from_version)
            stack.callback(self.device.progress.end)
            fwup = FwupProcess(
                fwup=cfg.fwup.path,
                devpath=cfg.fwup.devpath,
                task=cfg.fwup.task,
                extra_args=[*cfg.fwup.extra_args, *_public_key_args(cfg.fwup.public_keys)],
                env=dict(cfg.fwup.env),
            )
            try:
                self._fwup = await stack.enter_async_context(fwup)
            except FwupError as e:
                self._journal("failed", f"fwup could not start: {e}")
                raise UpdateRefused(str(e)) from None
            stack.callback(self._journal_abort)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._stop_unfinished)  # runs first: an unfinished fwup dies before we wait
            tg.start_soon(self._relay_events)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info("update started by %s", self.uploader)
        self.device.notify_status(f"receiving firmware from {self.uploader.user}@{self.uploader.peer}")
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._finished and self._applied is not None:
            # fwup already switched the boot env: its verdict stands even though the upload's
            # end never arrived, so the update goes on (inspect, swap or reboot) without the uploader.
            log.warning("fwup applied the update before the upload from %s ended; completing it", self.uploader)
            with anyio.CancelScope(shield=True):
                await self._complete(self._applied)
        elif not self._finished:
            self._aborted = self._aborted or (str(exc) if exc else "upload ended without completing")
            log.warning("update from %s aborted: %s; stopping fwup", self.uploader, self._aborted)
        await self._stack.aclose()  # kills an unfinished fwup first (synchronously), then waits

    def _stop_unfinished(self) -> None:
        if not self._finished and self._fwup is not None:
            self._fwup.kill()

    def _journal_abort(self) -> None:
        if not self._finished:
            self._journal("failed", f"upload aborted: {self._aborted}; nothing was changed")

    # --- data ------------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        assert self._fwup is not None
        if self._aborted:
            raise UpdateError(self._aborted)
        limit = self.device.config.server.max_upload_size
        if limit and self.received + len(data) > limit:
            self.abort(f"upload exceeds the limit of {limit} bytes ([server] max_upload_size)")
            raise UpdateError(self._aborted or "")
        self.received += len(data)
        self.device.progress.set(received=self.received)
        if len(self._start) < 4:
            self._start += data[: 4 - len(self._start)]
            self._check(check_start, self._start)
        if self._applied is not None or self._skip is not None:
            return  # fwup finished already (bytes after the archive's end), or nothing to do
        pieces = self._holdback.push(data)
        if not self._head_read:
            # kept apart from the hold-back, which releases the first bytes of a large first chunk
            self._head_bytes += data[: MAX_HEAD - len(self._head_bytes)]
            self._read_head(final=self.received >= MAX_HEAD)
            if self._skip is not None:
                return
        for piece in pieces:
            await self._feed(piece)

    async def _mark_target(self) -> None:
        """fwup is about to see its first bytes and may start writing the inactive slot: record
        that slot as incomplete first (fwup's on-finish unsets it as it switches to the slot)."""
        assert self.before is not None and self.root is not None
        self._target = other_slot(self.before.active or self.root)
        try:
            await self.device.bootenv.mark_slot(self._target, INCOMPLETE)
        except BootEnvError as e:
            reason = f"update failed: cannot write the boot environment ({e}); the device was not changed"
            self._journal("failed", reason)
            self.abort(reason)
            raise UpdateError(reason) from None

    def _read_head(self, *, final: bool) -> None:
        """Read meta.conf (and the first resource's header) before fwup sees a byte: the same
        firmware as the one running needs no update at all, and a delta patch made for another
        firmware than the running one is refused."""
        head = read_head_bytes(bytes(self._head_bytes), public_keys=self.device.config.fwup.public_keys,
                               final=final)  # fmt: skip
        if head is None and not final:
            return
        self._head_read, self.head, self._head_bytes = True, head, bytearray()
        if head is None or self.before is None or self.root is None:
            return
        patch = f", a delta patch for {head.delta_source}" if head.delta_source else ""
        log.info("upload from %s is %s %s (uuid %s%s)", self.uploader, head.product, head.version, head.uuid, patch)
        self.device.progress.set(to_version=head.version)
        running = self.before.slots[self.root]
        if (running.version and head.version and version_key(head.version) < version_key(running.version)
                and running.uuid != head.uuid):  # fmt: skip
            if not self.device.config.update.allow_downgrade:
                reason = (f"update refused: {head.version} is older than the running {running.version} (a downgrade); "
                          f"set [update] allow_downgrade = true on the device to allow it; the device was not changed")
                self._journal("failed", reason)
                self.abort(reason)
                raise UpdateError(reason)
            self.downgrade = True
            log.warning("downgrade from %s to %s by %s", running.version, head.version, self.uploader)
        if running.uuid and running.uuid == head.uuid:
            self._skip = Outcome(True, f"already running {head.version} (uuid {head.uuid}); nothing changed")
            self._journal("unchanged", self._skip.verdict, to_slot=self.root, to_version=head.version)
            if self._fwup is not None:
                self._fwup.kill()  # it has seen nothing
            return
        source = head.delta_source
        if source is not None and source.uuid != running.uuid:
            # fwup would find out only at the end, after rewriting the whole slot from the wrong source
            runs = f"{running.version or 'a firmware'} (uuid {running.uuid})" if running.uuid else (
                f"{running.version or 'a firmware'} whose uuid is not recorded ({self.root}.nerves_fw_uuid unset)")
            reason = (
                f"this upload is a delta patch to {head.version} for firmware {source}, but the device runs "
                f"{runs} in slot {self.root}; send the full .fw, or a patch made from the firmware the device runs; "
                "the device was not changed"
            )
            self._journal("failed", reason)
            self.device.last_outcome = {"ok": False, "verdict": reason}
            self.abort(reason)
            raise UpdateRefused(reason)

    async def _feed(self, data: bytes | memoryview) -> None:
        assert self._fwup is not None
        if self._target is None:
            await self._mark_target()
        idle = self.device.config.server.idle_timeout
        try:
            with anyio.fail_after(idle):
                await self._fwup.write(data)
        except TimeoutError:
            reason = f"update failed: fwup accepted no data for {idle:.0f} s and was stopped; the device was not changed"
            log.error("fwup (pid %d) hung: it read nothing for %.0f s", self._fwup.pid, idle)
            self._journal("failed", reason)
            self.abort(reason)
            raise UpdateError(reason) from None
        except FwupError:
            # fwup stopped reading: it failed on what it got — or it already succeeded
            result = await self._fwup_exit(idle)
            if result.success:
                log.warning("fwup finished before the end of the upload from %s (bytes after the archive)", self.uploader)
                self._applied = result
                return
            reason = f"update failed: {result.reason}; the device was not changed"
            self._journal("failed", reason)
            raise UpdateError(reason) from None

    def _check(self, check: Callable[..., object], *args: Any) -> None:
        try:
            check(*args)
        except IncompleteArchive as e:
            reason = f"update failed: {e}; the device was not changed"
            self._journal("failed", reason)
            self.abort(str(e))
            raise UpdateError(reason) from None

    def abort(self, reason: str) -> None:
        """Stop now (disconnect, limit, timeout): fwup is killed before it can switch anything."""
        if self._finished:
            return
        self._aborted = self._aborted or reason
        if self._fwup is not None:
            self._fwup.kill()

    async def finish(self) -> Outcome:
        """The uploader sent a genuine, complete EOF: check the archive's end, let fwup finish,
        then run the callback."""
        assert self._fwup is not None
        if self._aborted:
            raise UpdateError(self._aborted)
        if not self._head_read and self._skip is None:
            self._read_head(final=True)
        if self._skip is not None:
            self._finished = True
            return self._conclude(self._skip)
        result = self._applied
        if result is None:
            tail = self._holdback.tail()
            self._check(check_start, self._start)
            self._check(check_end, tail, self.received)
            await self._feed(tail)
            result = self._applied or await self._fwup_exit(self.device.config.server.idle_timeout)
        return await self._complete(result)

    async def _complete(self, result: FwupResult) -> Outcome:
        self._finished = True
        await self._relayed.wait()
        self.device.notify_status(f"fwup: {result.reason}")
        if not result.success:
            outcome = Outcome(False, f"update failed: {result.reason}; {await self._unchanged()}")
            log.warning("update from %s failed: %s", self.uploader, result.reason)
            self._journal("failed", outcome.verdict)
            return self._conclude(outcome)
        log.info("fwup applied %d bytes from %s in %.1f s", result.bytes_in, self.uploader, time.monotonic() - self.started)
        outcome = await self._success(result)
        # A callback that did not record how it ended (report_only, a custom one) leaves the
        # firmware installed for the next boot: say so, or recovery would undo it.
        after = self.after
        target = {"to_slot": after.active, "to_version": after.version(after.active)} if after and after.active else {}
        self._journal("installed" if outcome.ok else "failed", outcome.verdict, **target)
        return self._conclude(outcome)

    def _conclude(self, outcome: Outcome) -> Outcome:
        """Record the outcome for ``status``; a reboot verdict asks the server to reboot (it waits
        for the uploader's channel to close first)."""
        if self.downgrade and outcome.ok and self.head is not None:
            outcome = Outcome(outcome.ok, f"downgrade to {self.head.version}: {outcome.verdict}", outcome.reboot,
                              outcome.details)  # fmt: skip
        log.info("update from %s: %s", self.uploader, outcome.verdict)
        self.device.last_outcome = {"ok": outcome.ok, "verdict": outcome.verdict}
        if outcome.reboot:
            self.device.request_reboot(outcome.verdict)
        return outcome

    def _journal(self, stage: str, verdict: str, **fields: Any) -> None:
        from .journal import ACTIVE_STAGES

        journal = self.device.journal
        if journal is not None and journal.current is not None and journal.current.stage in ACTIVE_STAGES:
            if journal.current.to_slot:
                fields = {}
            journal.advance(stage, verdict=verdict, **fields)  # type: ignore[arg-type]

    # --- internals -------------------------------------------------------------------------

    async def _precheck(self) -> None:
        dev = self.device
        try:
            before = await dev.boot_state()
        except BootEnvError as e:
            raise UpdateRefused(f"cannot read the boot environment: {e}") from None
        root = dev.running_root()
        self.before, self.root = before, root
        if root is None:
            raise UpdateRefused(
                f"cannot tell which slot is running: nothing from [device] slots is mounted at {dev.config.device.root_mount}"
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
        stale = dev.config.server.run_dir / "slots" / target
        if is_mounted(stale):
            try:
                await unmount(stale)
            except SlotError as e:
                raise UpdateRefused(f"slot {target} is still in use ({e}); reboot the device first") from None
        spec = dev.config.fwup.precheck_callback
        if spec:
            ctx = UpdateContext(dev, self.uploader, self.report, before, root)
            try:
                verdict = await call(load_callback(spec), ctx)
            except UpdateRefused:
                raise
            except Exception as e:
                raise UpdateRefused(f"precheck failed: {e}") from None
            if verdict not in (None, True):
                raise UpdateRefused(f"precheck refused the update: {verdict}")

    async def _relay_events(self) -> None:
        assert self._fwup is not None
        try:
            async for event in self._fwup.events():
                if isinstance(event, Progress):
                    self.device.progress.set(percent=event.percent)
                await self.report.event(event)
        finally:
            self._relayed.set()

    async def _fwup_exit(self, timeout: float) -> FwupResult:
        """fwup's result once its input ended or it stopped reading (bounded: a hung fwup is killed)."""
        assert self._fwup is not None
        with anyio.move_on_after(timeout):
            return await self._fwup.finish()
        self._fwup.kill()
        log.error("fwup did not exit within %d s after its input ended; killed it", timeout)
        return FwupResult(exit_code=None, success=False, errors=(f"fwup hung: no result {timeout:.0f} s after its input ended; killed",))

    async def _unchanged(self) -> str:
        """After a failed fwup: the boot env must still name the slot that was active before (a fwup
        killed inside on-finish may have got further than its exit status says)."""
        try:
            now = await self.device.boot_state()
        except BootEnvError as e:
            return f"the boot environment cannot be read to confirm nothing changed ({e})"
        if self.before is not None and now.active == self.before.active:
            return "the device was not changed"
        log.error("fwup failed but the boot env now names slot %s; reverting", now.active)
        return f"fwup had switched the boot env; {await self._revert(INCOMPLETE)}"

    async def _revert(self, state: str = ROLLED_BACK) -> str:
        """Undo fwup's switch of the boot env: a failed update must leave the old firmware booting,
        and the slot it wrote is marked (``state``) so that nothing reverts to it later."""
        if self.root is None:
            return "the boot env was left as fwup set it"
        try:
            await self.device.bootenv.revert_to(self.root, also={slot_state_var(other_slot(self.root)): state})
            return f"boot env reverted to slot {self.root}"
        except BootEnvError as e:
            return f"REVERTING THE BOOT ENV FAILED ({e})"

    async def _success(self, result: FwupResult) -> Outcome:
        dev = self.device
        spec = dev.config.fwup.success_callback
        try:
            after = self.after = await dev.boot_state()
            if after.active and after.slots[after.active].state == INCOMPLETE:
                # an fwup.conf that does not unset it in on-finish: the slot is whole now
                await dev.bootenv.mark_slot(after.active, None)
                after = self.after = await dev.boot_state()
        except BootEnvError as e:
            return Outcome(False, f"fwup finished but the boot environment cannot be read: {e}")
        if after.active:
            if self.head is not None:
                record(dev.config.server.data_dir, after.active, self.head.uuid, self.head.version, self.head.resources)
            else:
                forget(dev.config.server.data_dir, after.active)
        dev.progress.set(stage="applied", to_slot=after.active, to_version=after.version(after.active) if after.active else None)
        ctx = UpdateContext(dev, self.uploader, self.report, after, self.root, result, self.head)
        if not spec:
            return Outcome(True, _applied_verdict(ctx))
        try:
            outcome = await call(load_callback(spec), ctx)
        except Exception as e:
            if not isinstance(e, UpdateError):
                log.exception("success callback %s failed", spec)
            reason = str(e) if isinstance(e, UpdateError) else f"the success callback {spec} failed: {e}"
            return Outcome(False, f"{reason}; {await self._revert()}")
        if outcome is None:
            return Outcome(True, _applied_verdict(ctx))
        if not isinstance(outcome, Outcome):
            return Outcome(False, f"the success callback {spec} returned {outcome!r}, not an Outcome; {await self._revert()}")
        return outcome


def _applied_verdict(ctx: UpdateContext) -> str:
    active = ctx.boot.active
    version = ctx.boot.version(active) if active else None
    return f"firmware {version or '?'} installed in slot {active or '?'}; it runs after the next reboot"


def _public_key_args(keys: tuple[Any, ...]) -> list[str]:
    args: list[str] = []
    for key in keys:
        args += ["--public-key-file", str(key)]
    return args


async def report_only(ctx: UpdateContext) -> Outcome:
    """Success callback that reports and does nothing else (the device boots it on next reboot)."""
    return Outcome(True, _applied_verdict(ctx))
