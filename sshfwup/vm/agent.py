"""The host's side of QEMU's guest agent (qemu-guest-agent in the image): run a command on the
device as root and get its exit status and output — the tests' view of systemd, cgroups and the
journal, which sshfwup's SSH server (update commands only) does not offer.

One JSON request per line on the virtio-serial port's unix socket; ``guest-exec`` starts the
command, ``guest-exec-status`` is polled until it exited (output base64-encoded).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from sshfwup.vm.errors import VmError

__all__ = ["AgentError", "Exec", "guest_exec", "guest_poweroff", "wait_agent"]


class AgentError(VmError):
    """The guest agent did not answer or refused the command."""


@dataclass(frozen=True)
class Exec:
    status: int
    stdout: str
    stderr: str


async def _call(sock: Path, request: dict[str, Any], timeout: float = 10.0) -> Any:
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_unix(str(sock)) as stream:
                # guest-sync-delimited flushes whatever an earlier client left half-read
                sync = {"execute": "guest-sync", "arguments": {"id": int(time.monotonic() * 1000) % 2**31}}
                buffered = b""
                for msg in (sync, request):
                    await stream.send(json.dumps(msg).encode() + b"\n")
                    while b"\n" not in buffered:
                        buffered += await stream.receive()
                    line, _, buffered = buffered.partition(b"\n")
                    reply = json.loads(line)
                    if "error" in reply:
                        raise AgentError(f"guest agent: {reply['error'].get('desc', reply['error'])}")
                return reply.get("return")
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, ValueError) as e:
        raise AgentError(f"guest agent at {sock} did not answer: {e or type(e).__name__}") from None


async def wait_agent(sock: Path, deadline: float) -> None:
    """Until the guest agent answers (monotonic ``deadline``)."""
    while True:
        try:
            await _call(sock, {"execute": "guest-ping"}, timeout=3)
            return
        except AgentError:
            if time.monotonic() > deadline:
                raise
            await anyio.sleep(1)


async def guest_exec(sock: Path, argv: list[str], *, timeout: float = 60.0) -> Exec:
    """Run ``argv`` on the device as root; its status and output."""
    started = await _call(sock, {"execute": "guest-exec",
                                 "arguments": {"path": argv[0], "arg": argv[1:], "capture-output": True}})  # fmt: skip
    pid = started["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await _call(sock, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        if status.get("exited"):

            def text(key: str) -> str:
                return base64.b64decode(status.get(key, "")).decode(errors="replace")

            return Exec(int(status.get("exitcode", -1)), text("out-data"), text("err-data"))
        await anyio.sleep(0.2)
    raise AgentError(f"{' '.join(argv)}: still running on the device after {timeout:.0f} s")


async def guest_poweroff(sock: Path) -> None:
    """Ask the device to power off cleanly: ``systemctl poweroff`` started through the agent.
    (The agent's own guest-shutdown runs ``shutdown +0``, which asks logind over D-Bus: this
    minimal Debian has neither, and nothing happens.)"""
    await _call(sock, {"execute": "guest-exec", "arguments": {"path": "/bin/systemctl", "arg": ["poweroff"]}})
