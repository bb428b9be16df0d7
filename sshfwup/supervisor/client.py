"""The SSH front's side of the local protocol with the supervisor (``control.py`` describes the
wire): what the pipeline and the commands ask of the app's owner, from the other process."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from .control import VERSION, MessageReader, ProtocolError, encode
from .errors import SupervisorError, SwapFailed
from .instance import AppSource
from .logring import LogRing
from sshfwup.update.lock import DeviceLock

log = logging.getLogger(__name__)

__all__ = ["SupervisorClient", "SupervisorGone", "SwapAnswer"]

Report = Callable[[str], Awaitable[None]]


class SupervisorGone(SupervisorError):
    """The supervisor did not answer (it is gone, or refused the request); the text says which."""


@dataclass(frozen=True)
class SwapAnswer:
    ready_at: float | None  # time.monotonic() (one clock for both processes) the new version served from
    handoff: str = ""


class SupervisorClient:
    """Requests to the supervisor over the inherited control socket; one stream per request."""

    def __init__(self, control: socket.socket, *, lock: DeviceLock | None = None) -> None:
        self._control = control
        self._lock = lock

    @asynccontextmanager
    async def _request(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> AsyncIterator[_Lines]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                socket.send_fds(self._control, [b"R"], [theirs.fileno(), *fds])
            except OSError as e:
                ours.close()
                raise SupervisorGone(f"the supervisor cannot be reached: {e}") from None
        finally:
            theirs.close()
        stream = await anyio.abc.UNIXSocketStream.from_socket(ours)
        async with stream:
            await stream.send(encode({"v": VERSION, **message}))
            yield _Lines(stream)

    async def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        async with self._request(message) as lines:
            answer = await lines.next()
        if not answer.get("ok"):
            raise SupervisorGone(f"the supervisor refused {message.get('op')!r}: {answer.get('error')}")
        return answer

    async def hello(self) -> dict[str, Any]:
        return await self._ask({"op": "hello", "pid": os.getpid()})

    async def state(self) -> dict[str, Any]:
        """``app``, ``app_down``, ``app_last_exit`` (as ``status --json`` shows them), ``last_outcome``, ``rebooting``."""
        return await self._ask({"op": "state"})

    async def notify(self, text: str) -> None:
        await self._ask({"op": "notify", "text": text})

    async def swap(self, source: AppSource, *, report: Report | None = None) -> SwapAnswer:
        """Ask the supervisor to swap the app to ``source``; its progress lines go to ``report``.
        The update lock (ours) goes along: the supervisor keeps it until the swap's ending is
        recorded, even if this process dies meanwhile. SwapFailed: the old version serves."""
        lock_fd = self._lock.fileno() if self._lock is not None else None
        message = {"op": "swap", "root": str(source.root), "slot": source.slot, "version": source.version}
        async with self._request(message, () if lock_fd is None else (lock_fd,)) as lines:
            while True:
                answer = await lines.next()
                if "line" in answer:
                    if report is not None:
                        await report(str(answer["line"]))
                    continue
                break
        if answer.get("ok"):
            ready_at = answer.get("ready_at")
            return SwapAnswer(float(ready_at) if isinstance(ready_at, (int, float)) else None, str(answer.get("handoff") or ""))
        raise SwapFailed(str(answer.get("error")), rollback="", new_pid=None, restored=None)

    async def mirror_logs(self, ring: LogRing) -> None:
        """Copy the supervisor's log ring into ``ring`` (the front's, that ``logs`` reads), line by
        line, until the supervisor goes away."""
        async with self._request({"op": "logs"}) as lines:
            while True:
                item = await lines.next()
                if "text" in item:
                    ring.append(str(item["text"]))
                elif isinstance(item.get("missed"), int):
                    ring.append(f"-- {item['missed']} lines skipped: the SSH front fell behind the supervisor's log --")


class _Lines:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self._reader = MessageReader(stream)

    async def next(self) -> dict[str, Any]:
        try:
            return await self._reader.next()
        except ProtocolError as e:
            raise SupervisorGone(f"no answer from the supervisor: {e}") from None
