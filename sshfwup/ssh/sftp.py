"""A virtual SFTP server with exactly one thing in it: a place to upload firmware.

Uploading to ``/fwup`` (or any ``NAME.fw`` at the top level) streams the bytes into an update.
OpenSSH 9 ``scp`` (SFTP mode) does stat → open(WRITE|CREAT) → sequential writes → fsetstat → close;
``sftp put`` does realpath → stat → open(WRITE|CREAT|TRUNC) → writes → close; paramiko's ``put``
stats the path after the close and compares the size (``confirm=True``). Every other operation is
refused, and nothing here touches the server's real filesystem.

How a failed update reaches the client: the write (when the update stopped mid-upload) or the
close fails with the device's reason, which also goes to stderr; and ``stat`` after the close tells
the truth — the size written when the update was applied, "no such file" with the device's reason
when it was not. paramiko's ``put`` ignores failed writes and closes (docs/clients.md): only its
``confirm`` stat shows a refusal.
"""

from __future__ import annotations

import logging
import stat as statmod
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.abc
import asyncssh
from asyncssh import (
    SFTPAttrs,
    SFTPFailure,
    SFTPName,
    SFTPNoSuchFile,
    SFTPOpUnsupported,
    SFTPPermissionDenied,
)

from sshfwup.device import Device
from sshfwup.update.intake import CUT, Intake, UploadBounds, UploadStopped
from sshfwup.update.report import Report
from sshfwup.update.update import EXIT_FAILED, EXIT_OK, Outcome, Update, UpdateError, UpdateRefused, Uploader

log = logging.getLogger(__name__)

__all__ = ["FirmwareSFTPServer", "UploadTarget", "parse_target"]

FXF_READ = 0x01
FXF_WRITE = 0x02
FXF_APPEND = 0x04

ONLY_UPLOADS = "this device only accepts firmware uploads (put a .fw file to /fwup)"


class UploadTarget(str):
    """A validated upload path: ``/fwup`` or ``/NAME.fw``."""


def parse_target(path: bytes | str) -> UploadTarget | None:
    """``None`` for the root directory; an :class:`UploadTarget`; or an SFTP error to refuse."""
    try:
        text = path.decode("utf-8") if isinstance(path, bytes) else path
    except UnicodeDecodeError:
        raise SFTPPermissionDenied("path is not valid UTF-8") from None
    if "\x00" in text:
        raise SFTPPermissionDenied("path contains a NUL byte")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SFTPPermissionDenied("paths outside the upload area (..) are not allowed")
    if not parts:
        return None
    if len(parts) == 1 and (parts[0] == "fwup" or (parts[0].endswith(".fw") and len(parts[0]) > 3)):
        return UploadTarget("/" + parts[0])
    raise SFTPNoSuchFile(f"/{'/'.join(parts)}: no such file; {ONLY_UPLOADS}")


def _root_attrs() -> SFTPAttrs:
    return SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY, permissions=statmod.S_IFDIR | 0o755, size=0)


def _file_attrs(size: int) -> SFTPAttrs:
    return SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, permissions=statmod.S_IFREG | 0o200, size=size)


class _UploadBridge:
    """Runs one :class:`Update` in a task the server owns; SFTP requests feed it chunks.

    SFTP's open/write/close arrive as separate requests, so the update (a context manager that
    owns fwup) lives in its own task, and a small bounded stream carries the data: a full stream
    blocks the SFTP request loop, which stops reading the channel — backpressure to the client.
    """

    def __init__(self, device: Device, uploader: Uploader, report: Report) -> None:
        self._device, self._uploader, self._report = device, uploader, report
        self._send, self._recv = anyio.create_memory_object_stream[bytes](4)
        self._complete = False
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._first_taken = anyio.Event()  # the update took (checked) the first chunk, or stopped
        self.outcome: Outcome | None = None
        self.error: str | None = None
        self.told = False  # the uploader was told how it ended already
        self.offset = 0

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        await tg.start(self._run)  # raises UpdateRefused if the precheck refuses

    async def _run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        started = False
        try:
            with self._scope:
                async with Update(self._device, self._uploader, self._report) as update:
                    task_status.started()
                    started = True
                    intake = Intake(update, UploadBounds.of(self._device.config.server))
                    try:
                        while chunk := await intake.read(self._next_chunk):
                            await update.write(chunk)
                            self._first_taken.set()
                    finally:
                        self._recv.close()
                    if not self._complete:
                        update.abort(CUT)
                        self.error = CUT
                        return
                    self.outcome = await update.finish()
        except UpdateRefused as e:
            if not started:
                raise
            self.error = str(e)  # refused mid-upload (a delta patch for another firmware): say why
        except UploadStopped as e:
            # a bound ended it while the client is stalled or gone: say so now, not at a close
            # that may never come (the same line as on the other transports)
            self.error = str(e)
            self.told = True
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self._report.line(f"sshfwup: {e}")
        except UpdateError as e:
            self.error = str(e)
        except Exception as e:  # never let one upload take the server down
            log.exception("sftp upload failed")
            if not started:
                raise UpdateRefused(f"internal error: {e}") from e
            self.error = f"internal error: {e}"
        finally:
            self._recv.close()
            self._first_taken.set()
            self._done.set()

    async def _next_chunk(self) -> bytes:
        """The next write's data; b"" once the file is closed (or the session ended)."""
        try:
            return await self._recv.receive()
        except anyio.EndOfStream:
            return b""

    async def write(self, data: bytes) -> None:
        if not data:
            return  # an empty write: b"" is the end of the file on the stream
        first = self.offset == 0
        try:
            await self._send.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._done.wait()
            raise SFTPFailure(self.error or "the update stopped") from None
        self.offset += len(data)
        if first:
            # The first write's answer waits for the update's look at it (not a .fw, a refused
            # head): a small bad file then fails at its write, which every client reports —
            # PuTTY's pscp ignores a failed close (docs/clients.md). Later writes are answered
            # as they are queued (SFTP clients keep many in flight).
            await self._first_taken.wait()
            if self._done.is_set() and self.outcome is None:
                raise SFTPFailure(self.error or "the update stopped")

    @property
    def applied(self) -> bool:
        return self.outcome is not None and self.outcome.ok

    async def finish(self) -> Outcome:
        self._complete = True
        await self._send.aclose()
        await self._done.wait()
        if self.outcome is None:
            return Outcome(False, self.error or "the update stopped")
        return self.outcome

    async def abort(self) -> None:
        if not self._done.is_set():
            self._send.close()
            self._scope.cancel()
            await self._done.wait()


class FirmwareSFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel, *, device: Device, tg: anyio.abc.TaskGroup) -> None:
        super().__init__(chan)
        self._device = device
        self._tg = tg
        self._upload: _UploadBridge | None = None
        self._upload_target: UploadTarget | None = None
        self._status = EXIT_OK
        conn = chan.get_extra_info("connection")
        self._uploader = Uploader(
            user=chan.get_extra_info("username") or "?",
            fingerprint=conn.get_extra_info("sshfwup_fingerprint", "?") if conn else "?",
            peer=_peer(conn),
            transport="sftp",
        )

    # --- the one writable file ----------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> object:
        target = parse_target(path)
        if target is None:
            raise SFTPPermissionDenied(f"/ is a directory; {ONLY_UPLOADS}")
        if pflags & FXF_READ or not pflags & FXF_WRITE:
            raise SFTPPermissionDenied(f"reading is not allowed; {ONLY_UPLOADS}")
        if pflags & FXF_APPEND:
            raise SFTPPermissionDenied("appending is not allowed; upload the whole .fw file")
        if self._upload is not None:
            raise SFTPFailure("one upload per session: this session already uploaded a firmware")
        report = Report(self._write_stderr)
        bridge = _UploadBridge(self._device, self._uploader, report)
        try:
            await bridge.start(self._tg)
        except UpdateRefused as e:
            self._status = EXIT_FAILED
            await report.error(str(e))
            raise SFTPFailure(str(e)) from None
        self._upload, self._upload_target = bridge, target
        log.info("sftp upload to %s started by %s", target, self._uploader)
        return bridge

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        bridge = self._bridge(file_obj)
        if offset != bridge.offset:
            # fwup reads a stream; a client seeking around cannot be followed
            await bridge.abort()
            self._status = EXIT_FAILED
            raise SFTPFailure(f"non-sequential write at offset {offset} (expected {bridge.offset}); upload aborted")
        try:
            await bridge.write(data)
        except SFTPFailure as e:
            self._status = EXIT_FAILED
            if not bridge.told:
                # the failed write may be the last request a client sends (pscp exits on it): the
                # device's reason goes to stderr now, once, as on every transport
                bridge.told = True
                await Report(self._write_stderr).line(f"sshfwup: {e.reason}")
            raise
        return len(data)

    async def close(self, file_obj: object) -> None:
        bridge = self._bridge(file_obj)
        if not _client_sending(self.channel):
            # asyncssh closes the handles left open when a session ends: after a dropped connection
            # (or an EOF with the file still open) that is not the client's close of a whole file.
            await bridge.abort()
            self._status = EXIT_FAILED
            log.warning("sftp upload by %s interrupted after %d bytes: the session ended without a close",
                        self._uploader, bridge.offset)
            return
        outcome = await bridge.finish()
        self._status = outcome.exit_status
        if not bridge.told:
            await Report(self._write_stderr).line(f"sshfwup: {outcome.verdict}")
        if not outcome.ok:
            raise SFTPFailure(outcome.verdict)

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        self._bridge(file_obj)  # scp sets size/mode after writing: harmless, ignored

    def fstat(self, file_obj: object) -> SFTPAttrs:
        return _file_attrs(self._bridge(file_obj).offset)

    def fsync(self, file_obj: object) -> None:
        self._bridge(file_obj)

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        raise SFTPPermissionDenied(f"reading is not allowed; {ONLY_UPLOADS}")

    # --- the namespace: "/" and nothing else ----------------------------------------------

    def realpath(self, path: bytes) -> bytes:
        target = parse_target(path)
        return b"/" if target is None else target.encode()

    def stat(self, path: bytes) -> SFTPAttrs:
        target = parse_target(path)
        if target is None:
            return _root_attrs()
        bridge = self._upload
        if bridge is None or target != self._upload_target:
            raise SFTPNoSuchFile(f"{target} does not exist until you upload it")
        if bridge.outcome is None and bridge.error is None:  # still uploading: what has arrived
            return _file_attrs(bridge.offset)
        if bridge.applied:  # paramiko's put(confirm=True) compares this size with what it sent
            return _file_attrs(bridge.offset)
        reason = bridge.outcome.verdict if bridge.outcome is not None else bridge.error
        raise SFTPNoSuchFile(f"{target} was not installed: {reason}")

    lstat = stat

    def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        parse_target(path)
        raise SFTPPermissionDenied(ONLY_UPLOADS)

    lsetstat = setstat

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        raise SFTPPermissionDenied(f"listing is not allowed; {ONLY_UPLOADS}")
        yield  # pragma: no cover - makes this an async generator

    def _deny(self, *args: Any, **kwargs: Any) -> None:
        raise SFTPPermissionDenied(ONLY_UPLOADS)

    remove = mkdir = rmdir = rename = posix_rename = symlink = link = _deny

    def readlink(self, path: bytes) -> bytes:
        raise SFTPPermissionDenied(ONLY_UPLOADS)

    def statvfs(self, path: bytes) -> Any:
        raise SFTPOpUnsupported("statvfs is not supported")

    def fstatvfs(self, file_obj: object) -> Any:
        raise SFTPOpUnsupported("statvfs is not supported")

    def lock(self, file_obj: object, offset: int, length: int, flags: int) -> None:
        raise SFTPOpUnsupported("locking is not supported")

    def unlock(self, file_obj: object, offset: int, length: int) -> None:
        raise SFTPOpUnsupported("locking is not supported")

    def open56(self, *args: Any, **kwargs: Any) -> object:
        raise SFTPOpUnsupported("use SFTP version 3")

    # --- end of session -------------------------------------------------------------------

    async def exit(self) -> None:
        if self._upload is not None and self._upload.outcome is None:
            await self._upload.abort()
            if self._upload.error:
                self._status = EXIT_FAILED
                log.warning("sftp upload by %s interrupted", self._uploader)
        # Without an explicit exit status OpenSSH's scp reports failure after a good upload.
        try:
            self.channel.exit(self._status)
        except (OSError, asyncssh.Error):
            pass

    # --- helpers --------------------------------------------------------------------------

    def _bridge(self, file_obj: object) -> _UploadBridge:
        if not isinstance(file_obj, _UploadBridge) or file_obj is not self._upload:
            raise SFTPFailure("invalid handle")
        return file_obj

    async def _write_stderr(self, text: str) -> None:
        self.channel.write_stderr(text.encode("utf-8"))


def _client_sending(chan: asyncssh.SSHServerChannel) -> bool:
    """The client's side of the channel is still open: a close request now is a real one.

    asyncssh has no public "EOF received" flag; ``_recv_state`` is ``'open'`` until the client's
    EOF or close arrives (tests/test_sftp.py cuts connections to check this stays true)."""
    return not chan.is_closing() and getattr(chan, "_recv_state", "open") == "open"


def _peer(conn: Any) -> str:
    if conn is None:
        return "?"
    peer = conn.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "?"
