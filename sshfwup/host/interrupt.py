"""Ctrl-C during ``sshfwup upload``: one line saying what the device did, no traceback.

SIGINT does not raise KeyboardInterrupt here: :func:`run_interruptible` watches it and cancels
the innermost :meth:`Interrupt.guard` scope — the first Ctrl-C the upload, the second the one
status question that follows it (:func:`interrupted_line`, bounded by
:data:`INTERRUPT_QUESTION`). The exit status is :data:`EXIT_INTERRUPTED`, as a shell reports a
command ended by SIGINT.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import asyncssh

from .device_output import clean_text

__all__ = [
    "EXIT_INTERRUPTED",
    "INTERRUPT_POLL",
    "INTERRUPT_QUESTION",
    "Interrupt",
    "Stage",
    "describe_interrupted",
    "interrupted_line",
    "run_interruptible",
    "status_after_interrupt",
]

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command ended by SIGINT
INTERRUPT_QUESTION = 5.0  # after Ctrl-C: how long the device is asked what it did
INTERRUPT_POLL = 0.2  # between status questions while it still ends the cut upload

Asker = Callable[[], Awaitable[tuple[dict[str, Any] | None, str]]]
StatusOn = Callable[[asyncssh.SSHClientConnection, float], Awaitable[dict[str, Any] | None]]
Connect = Callable[[], AbstractAsyncContextManager[asyncssh.SSHClientConnection]]


class Stage(enum.Enum):
    """How far an upload got when it was interrupted."""

    CONNECTING = "connecting"
    PLANNING = "planning"  # --delta-from: asking what the device runs, making the patch
    SENDING = "sending"  # the fwup channel is open: the device may have begun the update
    DONE = "done"  # the device told its exit status


class Interrupt:
    """Ctrl-C as cancellation: :meth:`watch` (a task) turns each SIGINT into cancelling the
    innermost :meth:`guard` scope — the first one the upload, the second the status question
    that follows it. ``count``: the SIGINTs seen so far."""

    def __init__(self) -> None:
        self.count = 0
        self._scopes: list[anyio.CancelScope] = []

    @contextlib.contextmanager
    def guard(self) -> Iterator[anyio.CancelScope]:
        with anyio.CancelScope() as scope:
            self._scopes.append(scope)
            try:
                yield scope
            finally:
                self._scopes.remove(scope)

    def hit(self) -> None:
        self.count += 1
        if self._scopes:
            self._scopes[-1].cancel()

    async def watch(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            async for _ in signals:
                self.hit()


async def run_interruptible(work: Callable[[Interrupt], Awaitable[int]]) -> int:
    """``work(interrupt)`` with SIGINT cancelling its guarded scopes instead of raising
    KeyboardInterrupt (the main thread only)."""
    interrupt = Interrupt()
    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt.watch)
        try:
            return await work(interrupt)
        finally:
            tg.cancel_scope.cancel()
    raise AssertionError("unreachable")  # pragma: no cover - the task group returns above


async def interrupted_line(stage: Stage, interrupt: Interrupt, ask_status: Asker, hint: str) -> str:
    """The line after a Ctrl-C: what the device did, from one status question bounded by
    :data:`INTERRUPT_QUESTION` (``ask_status``: the device's status once it has ended the
    upload, or None and why not). A second Ctrl-C stops the question. ``hint``: what the
    operator can run instead (``run `ssh HOST status```)."""
    if stage is Stage.CONNECTING or stage is Stage.PLANNING:
        return "sshfwup: interrupted before the upload began: nothing was sent; the device was not changed"
    began = time.monotonic()
    answer: dict[str, Any] | None = None
    problem = "no answer"
    with interrupt.guard() as question, anyio.move_on_after(INTERRUPT_QUESTION):
        answer, problem = await ask_status()
    took = time.monotonic() - began
    log.debug("status question after Ctrl-C: %.2f s", took)
    if question.cancelled_caught:
        return f"sshfwup: interrupted again: not waiting for the device's answer; {hint}"
    if answer is None:
        problem = problem if took < INTERRUPT_QUESTION else f"no answer within {INTERRUPT_QUESTION:.0f} s"
        return f"sshfwup: interrupted; the device could not be asked what it did ({problem}); {hint}"
    return "sshfwup: " + describe_interrupted(answer, stage, hint)


def status_after_interrupt(conn: asyncssh.SSHClientConnection | None, connect: Connect, status_on: StatusOn) -> Asker:
    """The question :func:`interrupted_line` asks: the device's status once it has ended the
    interrupted upload (its update lock released), or the last answer while it still ends it;
    with why there is none. Over ``conn`` while it is open, else over ``connect()``; the caller
    bounds the time."""

    async def ask() -> tuple[dict[str, Any] | None, str]:
        nonlocal conn
        answer: dict[str, Any] | None = None
        problem = "no answer"
        while True:
            if conn is not None:
                answer = await status_on(conn, INTERRUPT_QUESTION)
                if answer is None:
                    conn = None  # closed under us: ask anew
            if answer is None:
                try:
                    async with connect() as fresh:
                        answer = await status_on(fresh, INTERRUPT_QUESTION)
                        problem = "it does not answer `status --json`" if answer is None else problem
                except (OSError, asyncssh.Error, TimeoutError) as e:
                    return None, str(e) or type(e).__name__
            if answer is None or not answer.get("update_in_progress"):
                return answer, problem
            await anyio.sleep(INTERRUPT_POLL)

    return ask


def describe_interrupted(s: dict[str, Any], stage: Stage, ask: str) -> str:
    """What a device's status says about an upload cut by Ctrl-C (one line, without "sshfwup: ")."""
    last = s.get("last_update") if isinstance(s.get("last_update"), dict) else None
    verdict = clean_text(str(last.get("verdict"))) if last and last.get("verdict") else None
    if s.get("update_in_progress"):
        update = s.get("update") if isinstance(s.get("update"), dict) else {}
        doing = f" ({clean_text(str(update['stage']))})" if update.get("stage") else ""
        return f"interrupted: the device is still ending the upload{doing}; {ask} to see how it ended"
    if stage is Stage.DONE:
        told = f": {verdict}" if verdict else ""
        return f"interrupted after the device's verdict{told} (from its status)"
    if last is None or verdict is None:
        return f"interrupted: the device records no update outcome (the upload had not reached fwup); {ask}"
    if last.get("ok"):
        return f"interrupted, but the device had already taken the whole upload: {verdict} (from its status)"
    for said in ("upload aborted: ", "update failed: "):  # the device's words say it once
        verdict = verdict.removeprefix(said)
    return f"interrupted: the device aborted the upload: {verdict} (from its status)"
