"""The supervisor's side of the local protocol between ``sshfwup serve``'s two processes.

The supervisor (long-lived: the app, its sockets, swaps, boot validation, the log ring) and the
SSH front (its child: asyncssh, uploads, fwup) share one inherited ``AF_UNIX`` socket pair, the
*control* channel. It carries no requests itself, only descriptors: for each request the front
makes a fresh socket pair and sends one end over the control channel (``SCM_RIGHTS``), with any
descriptor the request hands over (the update lock's, for a swap). So every request has a stream
of its own: concurrent requests need no multiplexing, a request is cancelled by closing it, and
no path on disk or abstract name exists for another local process to reach.

On a request's stream, both sides write JSON objects, one per line (at most ``MAX_LINE`` bytes).
The first line is the request: ``{"v": 1, "op": ..., ...}``; the answer is one or more lines,
the last one carrying ``"ok"``:

=========  ================================================  ===========================================
op         request                                           answer lines
=========  ================================================  ===========================================
hello      ``{"pid"}``                                       ``{"ok", "instance", "started", "pid"}``
state      (nothing)                                         ``{"ok", "app", "app_down", "app_last_exit",
                                                             "last_outcome", "rebooting"}``
swap       ``{"root", "slot", "version"}`` + the lock's fd   ``{"line"}`` …, then ``{"ok", "ready_at",
                                                             "handoff"}`` or ``{"ok": false, "error"}``
logs       (nothing)                                         ``{"seq", "text"}`` / ``{"missed"}``, forever
notify     ``{"text"}``                                      ``{"ok"}`` (a STATUS= line for systemd)
=========  ================================================  ===========================================

A request the supervisor cannot take (not JSON, too long, another protocol version, an unknown
op) is answered ``{"ok": false, "error": "..."}`` and closed; the supervisor logs it and goes on.
A swap outlives its request: when the front dies mid-swap the swap still completes or rolls
back, the supervisor records the ending itself (``on_orphaned_swap``), and only then closes its
copy of the update lock, so no upload starts while the app is still between versions.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.abc

from .errors import SwapFailed
from .instance import AppSource

if TYPE_CHECKING:
    from .logring import LogRing
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

__all__ = ["MAX_LINE", "VERSION", "ControlServer", "MessageReader", "OrphanedSwap", "ProtocolError", "app_state", "decode", "encode"]

#: The protocol's version: both processes come from the same install, so a mismatch means the
#: files were replaced under a running supervisor; the request is refused, never guessed at.
VERSION = 1
#: One JSON line, either way (a log line is bounded far below this by the ring).
MAX_LINE = 64 * 1024
#: How many descriptors one control message may carry (the request's end and the lock's).
MAX_FDS = 2
#: A request whose first line does not come within this is dropped (a hung or broken front).
REQUEST_TIMEOUT = 10.0


class ProtocolError(Exception):
    """A line that is not a message of this protocol; the text says what is wrong with it."""


def encode(message: dict[str, Any]) -> bytes:
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"message of {len(line)} bytes exceeds {MAX_LINE}")
    return line


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes exceeds {MAX_LINE}")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a JSON object, found {type(message).__name__}")
    return message


class MessageReader:
    """The messages on one request's stream, either side: a JSON object per line, each within
    ``MAX_LINE``. ProtocolError for anything else, and for a stream that ends mid-way."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            try:
                self._buffer += await self._stream.receive(MAX_LINE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                raise ProtocolError("the stream ended before a whole message") from None
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError(f"a line longer than {MAX_LINE} bytes")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return decode(line)


@dataclass(frozen=True)
class OrphanedSwap:
    """A swap whose front died before it was told the ending: the supervisor records it."""

    source: AppSource
    swapped: bool  # False: it failed and the old version serves (``error`` says why)
    error: str = ""


def app_state(sup: Supervisor | None) -> dict[str, Any]:
    """The app as ``status`` shows it (the supervisor's answer to ``state``)."""
    out: dict[str, Any] = {"app": None, "app_down": None, "app_last_exit": None}
    if sup is None:
        return out
    now = time.monotonic()
    inst = sup.current
    if inst is not None:
        out["app"] = {
            "pid": inst.pid,
            "version": inst.source.version,
            "slot": inst.source.slot,
            "root": str(inst.source.root),
            "uptime": round(now - inst.started_at, 1),
            "restarts": getattr(inst, "restarts", 0),
            # "exited": crashed, waiting for its restart (app_down says why)
            "state": "exited" if inst.returncode is not None else "running" if inst.ready_at else "starting",
        }
    if sup.outage is not None:
        out["app_down"] = {
            "reason": sup.outage.reason,
            "for": round(now - sup.outage.since, 1),
            "next_attempt_in": round(max(0.0, sup.outage.next_attempt - now), 1)
            if sup.outage.next_attempt is not None else None,
        }  # fmt: skip
    if sup.last_exit is not None:
        out["app_last_exit"] = sup.last_exit.to_json()
    return out


class Owner(Protocol):
    """What the control server reads of the device it serves (``sshfwup.device.Device``)."""

    supervisor: Supervisor | None
    last_outcome: dict[str, Any] | None
    last_outcome_at: float
    instance: str
    started: float
    logs: LogRing

    @property
    def rebooting(self) -> str | None: ...

    def notify_status(self, text: str) -> None: ...


class ControlServer:
    """Serves the front's requests on the control channel until it closes (the front is gone)."""

    def __init__(
        self,
        device: Owner,
        *,
        on_orphaned_swap: Callable[[OrphanedSwap], Awaitable[None]],
    ) -> None:
        self.device = device
        self._on_orphaned_swap = on_orphaned_swap
        self.last_seen = time.monotonic()  # the front's last request: a silent front hangs

    async def serve(self, control: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        """Take requests from ``control`` until EOF. Each request runs in ``tg`` (the supervisor's),
        so a swap goes on after the front is gone."""
        control.setblocking(False)
        while True:
            await anyio.wait_readable(control)
            try:
                data, fds, _flags, _addr = socket.recv_fds(control, 1, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                log.warning("the SSH front's control channel failed: %s", e)
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            self.last_seen = time.monotonic()
            if not fds:
                log.warning("the SSH front sent a control message without a request; ignored")
                continue
            request = socket.socket(fileno=fds[0])
            tg.start_soon(self._serve_request, request, fds[1:])

    async def _serve_request(self, sock: socket.socket, extra_fds: list[int]) -> None:
        stream = await anyio.abc.UNIXSocketStream.from_socket(sock)
        handed: list[int] = list(extra_fds)
        try:
            async with stream:
                try:
                    with anyio.fail_after(REQUEST_TIMEOUT):
                        message = await MessageReader(stream).next()
                    version = message.get("v")
                    if version != VERSION:
                        raise ProtocolError(f"protocol version {version!r} is not spoken here (the supervisor speaks {VERSION})")
                    op = message.get("op")
                    handler = self._handlers().get(op if isinstance(op, str) else "")
                    if handler is None:
                        raise ProtocolError(f"unknown op {op!r}")
                except TimeoutError:
                    log.warning("refused a request from the SSH front: no request line within %.0f s", REQUEST_TIMEOUT)
                    return
                except ProtocolError as e:
                    log.warning("refused a request from the SSH front: %s", e)
                    await _send(stream, {"ok": False, "error": str(e)})
                    return
                await handler(stream, message, handed)
        finally:
            for fd in handed:  # a request that took no descriptor (a bad one) drops them
                os.close(fd)

    def _handlers(self) -> dict[str, Callable[[anyio.abc.SocketStream, dict[str, Any], list[int]], Awaitable[None]]]:
        return {"hello": self._hello, "state": self._state, "swap": self._swap, "logs": self._logs, "notify": self._notify}

    async def _hello(self, stream: anyio.abc.SocketStream, message: dict[str, Any], fds: list[int]) -> None:
        device = self.device
        log.debug("the SSH front (pid %s) said hello", message.get("pid"))
        await _send(stream, {"ok": True, "instance": device.instance, "started": device.started, "pid": os.getpid()})

    async def _state(self, stream: anyio.abc.SocketStream, message: dict[str, Any], fds: list[int]) -> None:
        device = self.device
        out = app_state(device.supervisor)
        out["ok"] = True
        out["last_outcome"] = device.last_outcome
        out["last_outcome_at"] = device.last_outcome_at
        out["rebooting"] = device.rebooting
        await _send(stream, out)

    async def _notify(self, stream: anyio.abc.SocketStream, message: dict[str, Any], fds: list[int]) -> None:
        text = message.get("text")
        if isinstance(text, str) and "\n" not in text:
            self.device.notify_status(text[:512])
        await _send(stream, {"ok": True})

    async def _logs(self, stream: anyio.abc.SocketStream, message: dict[str, Any], fds: list[int]) -> None:
        ring = self.device.logs
        try:
            for line in ring.tail():
                await _send(stream, {"seq": line.seq, "text": line.text})
            async for item in ring.follow(ring.last_seq):
                if isinstance(item, int):
                    await _send(stream, {"missed": item})
                else:
                    await _send(stream, {"seq": item.seq, "text": item.text})
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the front closed it (or is gone)

    async def _swap(self, stream: anyio.abc.SocketStream, message: dict[str, Any], fds: list[int]) -> None:
        sup = self.device.supervisor
        try:
            source = AppSource(Path(_text(message, "root")), _text(message, "slot"), _text(message, "version"))
        except ProtocolError as e:
            await _send(stream, {"ok": False, "error": str(e)})
            return
        if sup is None:
            await _send(stream, {"ok": False, "error": "no application is supervised ([app] command is empty)"})
            return
        # The update lock's descriptor, passed by the front: held until the swap's ending is
        # recorded, by the front or (it died) by us.
        lock_fd = fds.pop(0) if fds else None
        told = True

        async def report(line: str) -> None:
            nonlocal told
            if told:
                told = await _try_send(stream, {"line": line})

        try:
            # Shielded: neither the front's death nor a closed request stops a swap midway.
            with anyio.CancelScope(shield=True):
                try:
                    result = await sup.swap(source, report=report)
                except SwapFailed as e:
                    if not (told and await _try_send(stream, {"ok": False, "error": str(e)})):
                        await self._on_orphaned_swap(OrphanedSwap(source, False, str(e)))
                    return
                answer = {"ok": True, "ready_at": result.ready_at, "handoff": result.handoff}
                if not (told and await _try_send(stream, answer)):
                    await self._on_orphaned_swap(OrphanedSwap(source, True))
        finally:
            if lock_fd is not None:
                os.close(lock_fd)


def _text(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ProtocolError(f"{key!r} must be a non-empty string")
    return value


async def _send(stream: anyio.abc.ByteSendStream, message: dict[str, Any]) -> None:
    await stream.send(encode(message))


async def _try_send(stream: anyio.abc.ByteSendStream, message: dict[str, Any]) -> bool:
    """Whether the line reached the front's socket (False: the front is gone)."""
    try:
        await _send(stream, message)
        return True
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return False
