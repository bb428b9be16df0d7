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

import logging
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio

from sshfwup.boot.bootenv import INCOMPLETE, BootEnvError, BootState, other_slot
from sshfwup.device import Device

from .precheck import precheck
from .rules import judge_head
from .after_fwup import after_failure, refused_before_writing, succeed, what_changed
from .callbacks import MOVED_CALLBACK_MODULES, UpdateContext, applied_verdict, load_callback
from .fwhead import MAX_HEAD, FirmwareHead, read_head_bytes
from .fwup import FwupError, FwupProcess, FwupResult, Message, Progress
from .holdback import Holdback, IncompleteArchive, check_end, check_start
from . import door
from .lock import DeviceBusy
from .outcome import EXIT_FAILED, EXIT_OK, Outcome, UpdateError, UpdateRefused, Uploader
from .report import Report

log = logging.getLogger(__name__)

# The transports and callbacks import these from here; configurations name ``sshfwup.update.update:report_only``.
__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "MOVED_CALLBACK_MODULES",
    "Outcome",
    "Update",
    "UpdateContext",
    "UpdateError",
    "UpdateRefused",
    "Uploader",
    "load_callback",
    "refused_before_writing",
    "report_only",
]

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
        self._failure_told = False  # status's last update names this update's (first) failure
        self._fwup_went_on = False  # fwup reported more than its start (a message, progress > 0)
        self.downgrade = False  # an older version than the running one, allowed by the config

    # --- lifecycle -------------------------------------------------------------------------

    async def _take_lock(self) -> None:
        """One change of state at a time, through the device's one door (door.py): refused at
        once while another holds the lock or a reboot is on its way; the device's own brief work
        (boot validation right after a boot) is waited for."""
        try:
            await door.acquire(self.device, f"an upload from {self.uploader}")
        except DeviceBusy as e:
            raise UpdateRefused(str(e)) from None

    async def __aenter__(self) -> "Update":
        cfg = self.device.config
        await self._take_lock()
        # Unwinds in reverse: relay task → fwup (killed unless finished) → lock.
        stack = AsyncExitStack()
        stack.callback(self.device.lock.release)
        try:
            try:
                await self._precheck()
            except UpdateRefused as e:  # (before fwup: nothing else follows to tell)
                raise _told_refusal(self.device, self.uploader, e) from None
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
                extra_args=[*cfg.fwup.extra_args, *self.device.bootenv.fwup_args(),
                            *_public_key_args(cfg.fwup.public_keys)],  # fmt: skip
                env=dict(cfg.fwup.env),
            )
            try:
                self._fwup = await stack.enter_async_context(fwup)
            except FwupError as e:
                reason = f"fwup could not start: {e}; the device was not changed"
                self._journal("failed", reason)
                raise UpdateRefused(reason) from None
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
            verdict = f"upload aborted: {self._aborted}; {self._what_changed()}"
            if not self._failure_told:  # the device log says what changed, as status does
                log.warning("update from %s failed: %s", self.uploader, verdict)
            self._journal("failed", verdict)

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
            await self._check(check_start, self._start)
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
        judged = judge_head(head, running, self.root, allow_downgrade=self.device.config.update.allow_downgrade)
        if judged.downgrade:
            self.downgrade = True
            log.warning("downgrade from %s to %s by %s", running.version, head.version, self.uploader)
        if judged.unchanged is not None:
            self._skip = Outcome(True, judged.unchanged)
            self._journal("unchanged", self._skip.verdict, to_slot=self.root, to_version=head.version)
            if self._fwup is not None:
                self._fwup.kill()  # it has seen nothing
            return
        if judged.refusal is not None:
            reason = str(judged.refusal)
            self._journal("failed", reason)
            self.abort(reason)
            raise judged.refusal

    async def _feed(self, data: bytes | memoryview) -> None:
        assert self._fwup is not None
        if self._target is None:
            await self._mark_target()
        idle = self.device.config.server.idle_timeout
        try:
            with anyio.fail_after(idle):
                await self._fwup.write(data)
        except TimeoutError:
            reason = f"update failed: fwup accepted no data for {idle:.0f} s and was stopped; {self._what_changed()}"
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
            await self._relayed.wait()  # its last events decide whether it may have written
            reason = f"update failed: {result.reason}; {await self._after_failure(result)}"
            self._journal("failed", reason)
            raise UpdateError(reason) from None

    async def _check(self, check: Callable[..., object], *args: Any) -> None:
        try:
            check(*args)
        except IncompleteArchive as e:
            self.abort(str(e))
            with anyio.move_on_after(5):  # fwup is dead: its last events say whether it wrote
                await self._relayed.wait()
            reason = f"update failed: {e}; {self._what_changed()}"
            self._journal("failed", reason)
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
            await self._check(check_start, self._start)
            await self._check(check_end, tail, self.received)
            await self._feed(tail)
            result = self._applied or await self._fwup_exit(self.device.config.server.idle_timeout)
        return await self._complete(result)

    async def _complete(self, result: FwupResult) -> Outcome:
        self._finished = True
        await self._relayed.wait()
        self.device.notify_status(f"fwup: {result.reason}")
        if not result.success:
            outcome = Outcome(False, f"update failed: {result.reason}; {await self._after_failure(result)}")
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

        if stage == "failed" and not self._failure_told:
            # `ssh DEVICE status` names the reason of every failed update, however early it failed:
            # it is where users of clients that hide the device's message look (README, Clients).
            # The first failure is the cause; an abort that follows it only repeats it.
            self.device.last_outcome = {"ok": False, "verdict": verdict}
            self._failure_told = True
        journal = self.device.journal
        if journal is not None and journal.current is not None and journal.current.stage in ACTIVE_STAGES:
            if journal.current.to_slot:
                fields = {}
            journal.advance(stage, verdict=verdict, **fields)  # type: ignore[arg-type]

    # --- internals -------------------------------------------------------------------------

    async def _precheck(self) -> None:
        try:
            before = await self.device.boot_state()
        except BootEnvError as e:
            raise UpdateRefused(f"cannot read the boot environment: {e}") from None
        self.before, self.root = before, self.device.running_root()
        await precheck(self.device, self.uploader, self.report, before, self.root)

    def _what_changed(self) -> str:
        return what_changed(self._target, self.root, self.before, wrote=self._fwup_went_on)

    async def _after_failure(self, result: FwupResult) -> str:
        self._target, words = await after_failure(self.device, self.before, self.root, self._target, result,
                                                  went_on=self._fwup_went_on)  # fmt: skip
        return words

    async def _relay_events(self) -> None:
        assert self._fwup is not None
        try:
            async for event in self._fwup.events():
                if isinstance(event, Message) or (isinstance(event, Progress) and event.percent > 0):
                    self._fwup_went_on = True
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

    async def _success(self, result: FwupResult) -> Outcome:
        outcome, self.after = await succeed(self.device, self.uploader, self.report, self.root, self.head, result,
                                             self.before)  # fmt: skip
        return outcome


def _told_refusal(device: Device, uploader: Uploader, refusal: UpdateRefused) -> UpdateRefused:
    """A refusal before fwup ran: it says that nothing changed, in the log and in ``status`` too
    (the last attempt, not only the last success)."""
    reason = f"{refusal}; the device was not changed"
    log.warning("update from %s refused: %s", uploader, reason)
    device.last_outcome = {"ok": False, "verdict": reason}
    return UpdateRefused(reason)


def _public_key_args(keys: tuple[Any, ...]) -> list[str]:
    args: list[str] = []
    for key in keys:
        args += ["--public-key-file", str(key)]
    return args


async def report_only(ctx: UpdateContext) -> Outcome:
    """Success callback that reports and does nothing else (the device boots it on next reboot)."""
    return Outcome(True, applied_verdict(ctx))
