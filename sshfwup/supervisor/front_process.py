"""The SSH front as the supervisor's child: start it, hear it, and start it again at once.

The front (``sshfwup/ssh/front.py``) gets the SSH listening sockets the supervisor bound and one
end of the control channel, as inherited descriptors. Its log lines arrive on its stderr and are
logged here under their own logger names, so the journal and ``ssh DEVICE logs`` have one log.
When it exits — a bug, the OOM killer, SIGKILL — its death is logged with its cause, whatever it
left running (fwup, a mount helper: its process group) is killed, ``on_exit`` is told (the
update it may have cut is settled there, see :mod:`sshfwup.daemon`), and a new front starts at
once; connections wait in the listen backlog meanwhile. Only a front that dies right after
starting, again and again, is restarted with a growing delay (up to ``MAX_BACKOFF``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc

from .control import ControlServer
from .logring import pump_lines

log = logging.getLogger(__name__)

__all__ = ["EXIT_IDLE", "FrontExit", "FrontProcess"]

#: The front's exit status when it left for lack of connections ([server] front_idle_exit): it
#: starts again when the next connection arrives on the SSH port.
EXIT_IDLE = 75

#: A front that lived shorter than this died "at start"; in a row, those back off.
QUICK_DEATH = 2.0
MAX_BACKOFF = 10.0

#: "LEVEL logger.name: message", the front's stderr format (``sshfwup serve --front``).
_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.\-]+): (.*)$", re.S)


@dataclass(frozen=True)
class FrontExit:
    pid: int
    returncode: int
    lived: float  # seconds

    def describe(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"was killed by {name}"
        return f"exited with status {self.returncode}"


class FrontProcess:
    def __init__(
        self,
        command: Sequence[str],
        listeners: Sequence[socket.socket],
        control: ControlServer,
        *,
        hang_timeout: float = 30.0,
        on_start: Callable[[int], None] | None = None,
        on_exit: Callable[[FrontExit], Awaitable[None]] | None = None,
    ) -> None:
        self.hang_timeout = hang_timeout
        self.command = list(command)
        self.listeners = list(listeners)
        self.control = control
        self._on_start = on_start
        self._on_exit = on_exit
        self.pid: int | None = None
        self.starts = 0

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Keep a front running until cancelled (then it is stopped with SIGTERM, then SIGKILL)."""
        delay = 0.0
        while True:
            if delay:
                await anyio.sleep(delay)
            ended = await self._run_once(tg)
            if ended.returncode == EXIT_IDLE:
                log.info("the SSH front (pid %d) left after %.0f s without connections; it starts again with the "
                         "next one", ended.pid, ended.lived)  # fmt: skip
                await _first_connection(self.listeners)
                delay = 0.0
                continue
            quick = ended.lived < QUICK_DEATH
            delay = min(max(delay * 2, 0.25), MAX_BACKOFF) if quick else 0.0
            log.error(
                "the SSH front (pid %d) %s after %.1f s; %s", ended.pid, ended.describe(), ended.lived,
                f"starting it again in {delay:.2f} s" if delay else "starting it again now; the app was not touched",
            )  # fmt: skip
            if self._on_exit is not None:
                tg.start_soon(self._on_exit, ended)

    async def _run_once(self, tg: anyio.abc.TaskGroup) -> FrontExit:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        listen_fds = [s.fileno() for s in self.listeners]
        argv = [*self.command, "--front", f"{','.join(map(str, listen_fds))}:{theirs.fileno()}"]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["SSHFWUP_SUPERVISOR_PID"] = str(os.getpid())
        started = time.monotonic()
        try:
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                pass_fds=(*listen_fds, theirs.fileno()), start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        self.pid = process.pid
        self.starts += 1
        if self._on_start is not None:
            self._on_start(process.pid)
        try:
            async with anyio.create_task_group() as inner:
                assert process.stderr is not None
                inner.start_soon(pump_lines, process.stderr, _relog)
                inner.start_soon(self.control.serve, ours, tg)
                inner.start_soon(self._kill_when_silent, process)
                await process.wait()
                inner.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    await _stop(process)
                _kill_group(process.pid)  # fwup and whatever else it left behind
                await process.aclose()
            ours.close()
            self.pid = None
        assert process.returncode is not None
        return FrontExit(process.pid, process.returncode, time.monotonic() - started)


    async def _kill_when_silent(self, process: anyio.abc.Process) -> None:
        """A front whose event loop is stuck (or stopped) serves no one: it says it is alive
        every third of ``hang_timeout``; silent for all of it, it is killed (and restarted)."""
        self.control.last_seen = time.monotonic()
        while True:
            silent = time.monotonic() - self.control.last_seen
            if silent > self.hang_timeout:
                log.error("the SSH front (pid %d) said nothing for %.0f s ([server] front_hang_timeout): it hangs; "
                          "killing it", process.pid, silent)  # fmt: skip
                process.kill()
                return
            await anyio.sleep(min(1.0, self.hang_timeout / 10))


async def _first_connection(listeners: Sequence[socket.socket]) -> None:
    """Until a connection waits in one of the listening sockets' backlogs (it is readable then);
    the connection itself is left there for the front to accept."""
    async with anyio.create_task_group() as tg:
        for sock in listeners:

            async def wait(sock: socket.socket = sock) -> None:
                await anyio.wait_readable(sock)
                tg.cancel_scope.cancel()

            tg.start_soon(wait)


async def _stop(process: anyio.abc.Process) -> None:
    process.terminate()
    with anyio.move_on_after(5):
        await process.wait()
        return
    process.kill()
    await process.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _relog(line: str) -> None:
    """One line of the front's stderr, logged as the front logged it (its level and logger)."""
    match = _LINE.match(line)
    if match:
        level, name, text = match.groups()
        logging.getLogger(name).log(logging.getLevelName(level), "%s", text)
    else:  # a traceback or a library's print: the front's all the same
        logging.getLogger("sshfwup.ssh.front").warning("%s", line)
