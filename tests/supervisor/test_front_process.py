"""supervisor/front_process.py with stand-in fronts (short Python programs, named as such): a
front that dies is started again with its death and cause logged; one that dies right after
starting, again and again, backs off instead of spinning; one that says nothing is killed as hung;
one that leaves idle is started again by the next connection only."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from sshfwup.supervisor.control import ControlServer
from sshfwup.supervisor.front_process import EXIT_IDLE, FrontExit, FrontProcess
from sshfwup.supervisor.logring import LogRing


class Owner:
    supervisor = None
    last_outcome = None
    last_outcome_at = 0.0
    instance = "x"
    started = 0.0
    rebooting = None

    def __init__(self) -> None:
        self.logs = LogRing()

    def notify_status(self, text: str) -> None:
        pass


@asynccontextmanager
async def running(code: str, **kwargs: Any) -> AsyncIterator[tuple[FrontProcess, list[FrontExit], socket.socket]]:
    """FrontProcess keeping ``python -c code`` running as its front, on a listening socket of its
    own, for as long as the block runs; the deaths it reported."""
    listener = socket.create_server(("127.0.0.1", 0))
    exits: list[FrontExit] = []

    async def on_exit(ended: FrontExit) -> None:
        exits.append(ended)

    async def nothing_orphaned(orphan: Any) -> None:
        pass

    front = FrontProcess([sys.executable, "-c", code], [listener], ControlServer(Owner(), on_orphaned_swap=nothing_orphaned),
                         on_exit=on_exit, **kwargs)  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(front.run, tg)
            yield front, exits, listener
            tg.cancel_scope.cancel()
    finally:
        listener.close()


async def run_front(code: str, seconds: float, **kwargs: Any) -> tuple[FrontProcess, list[FrontExit]]:
    """Run FrontProcess with ``python -c code`` as its front for ``seconds``."""
    async with running(code, **kwargs) as (front, exits, _):
        await anyio.sleep(seconds)
    return front, exits


async def test_a_front_dying_at_start_is_restarted_with_a_growing_delay(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "sshfwup.supervisor.front_process")
    front, exits = await run_front("import sys; print('ERROR sshfwup.ssh.front: broken', file=sys.stderr); sys.exit(3)", 2.5)
    # 0, 0.25, 0.5, 1.0 s apart: a handful of starts, not a spin (each start costs ~30 ms here)
    assert 2 <= front.starts <= 6, front.starts
    assert exits and all(e.returncode == 3 for e in exits)
    text = caplog.text
    assert "the SSH front (pid" in text and "exited with status 3" in text and "starting it again in 0.25 s" in text


async def test_the_fronts_lines_are_logged_under_its_own_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    await run_front("import sys; print('WARNING sshfwup.ssh.server: a line of the front', file=sys.stderr)", 0.5)
    assert any(r.name == "sshfwup.ssh.server" and r.levelno == logging.WARNING and r.getMessage() == "a line of the front"
               for r in caplog.records), caplog.text  # fmt: skip


async def test_a_silent_front_is_killed_as_hung(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "sshfwup.supervisor.front_process")
    _, exits = await run_front("import time; time.sleep(60)", 2.5, hang_timeout=1.0)
    assert exits and exits[0].returncode == -9 and exits[0].describe() == "was killed by SIGKILL", exits
    assert "said nothing for" in caplog.text and "[server] front_hang_timeout" in caplog.text


async def test_an_idle_front_is_started_again_only_by_a_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sshfwup.supervisor.front_process")
    # a stand-in front that accepts one connection if one waits, then leaves idle
    code = ("import socket, sys; fd = int(sys.argv[-1].split(':')[0]); s = socket.socket(fileno=fd); s.settimeout(0.2)\n"
            "try:\n    c, _ = s.accept(); c.sendall(b'hello'); c.close()\nexcept OSError:\n    pass\n"
            f"sys.exit({EXIT_IDLE})")  # fmt: skip
    async with running(code) as (front, exits, listener):
        await anyio.sleep(1.5)
        assert front.starts == 1, "an idle front must wait for a connection before it starts again"
        port = listener.getsockname()[1]
        answer = await anyio.to_thread.run_sync(lambda: socket.create_connection(("127.0.0.1", port), timeout=10).recv(5))
        assert answer == b"hello" and front.starts == 2
    assert exits == [], "an idle exit is not a death: nothing to settle"
    assert "without connections; it starts again with the next one" in caplog.text
