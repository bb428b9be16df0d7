"""The SSH front: the child process of ``sshfwup serve`` that faces the network.

It parses everything a client sends (SSH, SFTP, scp), streams uploads into fwup and runs the
update pipeline up to the swap — and it owns nothing that must outlive it. The supervisor (its
parent, :mod:`sshfwup.daemon`) binds the SSH port and passes the listening sockets in, so
connections wait in the backlog while a new front starts; the app, its sockets, swaps and the log
ring are the supervisor's, reached over the control socket (:mod:`sshfwup.supervisor.client`).

Started by the supervisor only: ``sshfwup serve --config FILE --front LISTEN_FDS:CONTROL_FD``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence

import anyio
import anyio.abc

from sshfwup.config import Config
from sshfwup.device import Device
from sshfwup.supervisor.client import SupervisorClient, SupervisorGone
from sshfwup.supervisor.control import VERSION
from sshfwup.supervisor.front_process import EXIT_IDLE
from sshfwup.system.capabilities import FRONT_DROPS, CapabilityError, drop
from sshfwup.update.journal import FAILED_STAGES, Journal, StageHook

from .server import FirmwareServer

log = logging.getLogger(__name__)

__all__ = ["EXIT_SUPERVISOR_GONE", "parse_fds", "run_front"]

#: The front's exit status when its supervisor cannot be spoken to (gone, or another protocol
#: version): restarting it changes nothing, the supervisor says what to do.
EXIT_SUPERVISOR_GONE = 78


def parse_fds(text: str) -> tuple[list[int], int]:
    """``"3,4:5"`` → listening fds [3, 4], control fd 5."""
    listen, _, control = text.partition(":")
    return [int(fd) for fd in listen.split(",") if fd], int(control)


async def run_front(
    config: Config, listen_fds: Sequence[int], control_fd: int, *, on_stage: StageHook | None = None
) -> int:
    _die_with_parent()
    _give_up_capabilities()
    control = socket.socket(fileno=control_fd)
    device = Device(config)
    device.journal = Journal(config.server.data_dir, on_stage=on_stage)
    client = SupervisorClient(control, lock=device.lock)
    try:
        hello = await client.hello()
    except SupervisorGone as e:
        log.error("the supervisor does not answer (protocol version %d): %s", VERSION, e)
        return EXIT_SUPERVISOR_GONE
    # `upload --wait` tells a reboot from this process's restart by the supervisor's instance.
    device.instance, device.started = str(hello["instance"]), float(hello["started"])
    device.server_pid = int(hello["pid"])
    if config.app.command:
        device.app = client
    rec = device.journal.current
    if rec is not None:
        device.last_outcome = {"ok": rec.stage not in FAILED_STAGES, "verdict": rec.verdict}
        device.last_outcome_at = 0.0  # the supervisor's, when it has one, is as new or newer
    server = FirmwareServer(config, device)
    sockets = [socket.socket(fileno=fd) for fd in listen_fds]
    async with anyio.create_task_group() as tg:
        device.status_relay = lambda text: tg.start_soon(_relay_status, client, text)
        await server.start(tg, sockets)
        tg.start_soon(server.reboot_when_requested)
        tg.start_soon(_mirror_logs, client, device, tg.cancel_scope)
        tg.start_soon(_say_alive, client, config.server.front_hang_timeout / 3)
        idle = anyio.Event()
        if config.server.front_idle_exit > 0:
            tg.start_soon(_leave_when_idle, server, device, config.server.front_idle_exit, idle)
        async with anyio.create_task_group() as waiting:
            waiting.start_soon(_until_signalled, waiting.cancel_scope)
            await idle.wait()
            waiting.cancel_scope.cancel()
        await server.close()
        tg.cancel_scope.cancel()
    return EXIT_IDLE if idle.is_set() else 0


async def _until_signalled(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("SSH front: received %s; closing", signal.Signals(signum).name)
            break
    scope.cancel()


async def _leave_when_idle(server: FirmwareServer, device: Device, seconds: float, idle: anyio.Event) -> None:
    """[server] front_idle_exit: no connection (open or held for room) and no update for
    ``seconds``: stop accepting and exit; the supervisor starts a front again when a connection
    waits on the SSH port. The look and the stop are one step (no await between them), so a
    connection arriving meanwhile stays in the kernel's backlog for the next front."""
    quiet_since = time.monotonic()
    while True:
        await anyio.sleep(min(1.0, seconds / 4))
        if server.connections or server.gate.waiting or device.lock.held or device.progress.current is not None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= seconds:
            server.gate.stop_accepting()
            log.info("SSH front: no connection for %.0f s ([server] front_idle_exit); leaving until the next one",
                     seconds)  # fmt: skip
            idle.set()
            return


async def _mirror_logs(client: SupervisorClient, device: Device, scope: anyio.CancelScope) -> None:
    """The supervisor's log ring, copied into ours for ``logs``; it ends when the supervisor
    goes, and so does this process (the kernel's PDEATHSIG is the other half of that)."""
    try:
        await client.mirror_logs(device.logs)
    except SupervisorGone as e:
        log.error("SSH front: the supervisor is gone (%s); exiting", e)
    scope.cancel()


async def _say_alive(client: SupervisorClient, every: float) -> None:
    """The supervisor takes a front that says nothing for [server] front_hang_timeout as hung."""
    while True:
        await anyio.sleep(every)
        try:
            await client.hello()
        except SupervisorGone as e:
            log.warning("SSH front: the supervisor did not answer: %s", e)


async def _relay_status(client: SupervisorClient, text: str) -> None:
    try:
        await client.notify(text)
    except SupervisorGone:
        pass  # a STATUS= line for systemd is not worth more


def _give_up_capabilities() -> None:
    """What only the supervisor needs, and what nothing here needs (capabilities.FRONT_DROPS), is
    given up for good before the first byte from a client is read. A kernel that refuses is
    logged, not fatal: SSH must come up whatever else is broken."""
    if os.geteuid() != 0:
        return
    try:
        dropped = drop(FRONT_DROPS)
    except (CapabilityError, OSError, AttributeError) as e:
        log.warning("SSH front: could not give up capabilities it does not need: %s", e)
        return
    if dropped:
        log.debug("SSH front: gave up %s", ", ".join(dropped))


def _die_with_parent() -> None:
    """SIGKILL when the supervisor dies, however it dies: no front serving without its supervisor."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError) as e:
        log.warning("SSH front: cannot tie its life to the supervisor's (%s)", e)
    expected = os.environ.get("SSHFWUP_SUPERVISOR_PID")
    if expected and os.getppid() != int(expected):
        sys.exit(EXIT_SUPERVISOR_GONE)  # it died before the tie was made
