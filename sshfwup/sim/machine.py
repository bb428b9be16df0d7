"""The simulated machine: firmware, init and service manager of one simulated device.

``sshfwup sim run D`` runs in the foreground for as long as the device is "powered":

- **boot**: U-Boot's choice (``bootloader.boot``), loop devices attached, data partition and the
  chosen slot mounted (``D/data``, ``R/root``: see ``sim/device.py``), ``[device] slots`` pointed at the loop devices,
  then the server started — like a systemd service with ``Type=notify``: it gets a
  ``NOTIFY_SOCKET`` and is ready when it sends ``READY=1`` (only the server's own pid counts,
  like ``NotifyAccess=main``). A boot that fails (an unmountable slot) is retried like a
  watchdog reset, so the boot counter can fall back; after several failures in a row the
  machine halts.
- **Restart=always**: a server that dies is started again after ``RESTART_DELAY`` — except
  when it exits with ``EXIT_CANNOT_LISTEN`` (systemd's ``RestartPreventExitStatus=``): a port
  it must listen on is taken, and no restart fixes that. Each boot first checks that the
  device's SSH and app ports are free. Either way the machine powers off with one error naming
  the port and, when it can tell, who holds it (``sim run`` exits 1).
- **Its owner's death**: started by ``SimMachine`` (a test, the demo), the machine gets the
  read end of a pipe whose write end only the owner holds (``--owner-fd``). The kernel closes it
  when the owner exits, however it dies (SIGKILL too), and the machine powers off on that EOF.
- **SIGUSR1** reboot (SIGTERM the server, wait ``STOP_TIMEOUT``, SIGKILL everything left,
  unmount, boot again), **SIGUSR2** power cut (SIGKILL everything at once, unmount, boot again),
  **SIGTERM/SIGINT** power off (stop, unmount, detach the loop devices, exit 0).

Every process started under the machine inherits ``SSHFWUP_SIM_MACHINE=<D>`` — the marker that
lets a reboot find the app processes the server spawned. The machine's state is kept in
``D/machine.json`` (atomically replaced; see ``sim/machine_state.py``) for ``SimMachine``
(``sim/machine_control.py``), the CLI and humans.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sshfwup.boot.bootenv import BootEnv, BootEnvError
from sshfwup.sim.bootloader import boot
from sshfwup.sim.device import (
    MACHINE_LOCK,
    MARKER_ENV,
    OWNER_ENV,
    SimDevice,
    SimError,
    claim,
    current_owner,
    kill_marked_processes,
)
from sshfwup.sim.machine_control import SimMachine, power_cut_machine, power_off_machine, reboot_machine
from sshfwup.sim.machine_state import MachineError, MachineState, write_state
from sshfwup.sim.sdnotify import NotifySocket
from sshfwup.sim.tryboot import REBOOT_PARAM, boot_tryboot
from sshfwup.system.ports import port_problem

log = logging.getLogger(__name__)

# SimMachine, the machine's state and the signals that reach it live in the modules named for
# them (machine_control, machine_state); these names stay importable from here.
__all__ = [
    "Machine",
    "MachineError",
    "MachineState",
    "SimMachine",
    "power_cut_machine",
    "power_off_machine",
    "reboot_machine",
    "run_machine",
]

RESTART_DELAY = 0.5
STOP_TIMEOUT = 10.0
WATCHDOG_DELAY = 0.5
MAX_FAILED_BOOTS = 5
# `sshfwup serve`'s exit status for a port it cannot listen on (sshfwup.cli.EXIT_CANNOT_LISTEN;
# not imported from there: the machine need not load the CLI). Never restarted.
EXIT_CANNOT_LISTEN = 3
RESTART_PREVENT_EXIT_STATUS = frozenset({EXIT_CANNOT_LISTEN})

# Requests the machine acts on, from signals.
REBOOT, POWER_CUT, POWER_OFF = "reboot", "power-cut", "power-off"
_SIGNAL_REQUESTS = {
    signal.SIGUSR1: REBOOT,
    signal.SIGUSR2: POWER_CUT,
    signal.SIGTERM: POWER_OFF,
    signal.SIGINT: POWER_OFF,
}


class Machine:
    """Runs inside ``sshfwup sim run D``; see the module documentation."""

    def __init__(
        self, device: SimDevice, *, server_command: Sequence[str] | None = None, owner_fd: int | None = None
    ) -> None:
        self.device = device
        self.dir = device.path
        self.server_command = list(server_command) if server_command else None
        self.owner_fd = owner_fd
        self.owner = current_owner()
        self.state = MachineState(pid=os.getpid(), state="booting")
        self.server: anyio.abc.Process | None = None
        self.stopping = False
        self.notify: NotifySocket | None = None
        self.requests: MemoryObjectSendStream[str] | None = None
        self.fatal: str | None = None  # why the machine powered itself off (a taken port)

    # --- state

    def _update(self, **changes: Any) -> None:
        self.state = MachineState(**{**asdict(self.state), **changes})
        write_state(self.dir, self.state)

    def _command(self) -> list[str]:
        """The server's command line: ``--server-command``, else the device's own setting (read
        at every start, like a service's ExecStart after a daemon-reload), else ``sshfwup serve``."""
        command = self.server_command or SimDevice.open(self.dir).server_command
        if command is None:
            return [sys.executable, "-m", "sshfwup", "serve", "--config", str(self.device.config_path)]
        subst = {"{config}": str(self.device.config_path), "{device}": str(self.dir)}
        out = []
        for arg in command:
            for token, value in subst.items():
                arg = arg.replace(token, value)
            out.append(arg)
        return out

    def _environment(self) -> dict[str, str]:
        assert self.notify is not None
        env = dict(os.environ)
        env[MARKER_ENV] = str(self.dir)
        env[OWNER_ENV] = self.owner.token
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        return env

    # --- boot and shutdown (blocking work runs in a worker thread)

    def _boot_sync(self) -> tuple[str, str]:
        if self.device.contract == "fwup-ops":  # a Pi-like firmware: autoboot.txt and the tryboot flag
            choice = boot_tryboot(self.device.disk, self.device.layout, self.device.path / REBOOT_PARAM)
        else:
            choice = boot(BootEnv(self.device.fw_env_config), self.device.contract)
        self.device.attach()
        self.device.mount_data()
        self.device.mount_root(choice.slot)
        self.device.refresh_slots()
        return choice.slot, choice.reason

    def _ports_in_use(self) -> str | None:
        """Why the server could not listen on the device's ports right now, or None."""
        for what, port in (("SSH", self.device.ssh_port), ("app", self.device.app_port)):
            problem = port_problem("127.0.0.1", port)
            if problem is not None:
                return f"the {what} port of the simulated device {self.dir}: {problem}"
        return None

    def _power_off_for(self, problem: str) -> None:
        """Stop for good: a problem no restart or reboot fixes (a port someone else holds)."""
        log.error("%s; powering off", problem)
        self.fatal = problem
        self._update(error=problem)
        assert self.requests is not None
        try:
            self.requests.send_nowait(POWER_OFF)
        except anyio.WouldBlock:
            log.warning("too many pending requests; cannot queue the power-off")

    async def _boot(self) -> bool:
        self._update(
            state="booting", boot_count=self.state.boot_count + 1, ready=False, status=None,
            server_pid=None, slot=None, error=None,
        )
        problem = await anyio.to_thread.run_sync(self._ports_in_use)
        if problem is not None:
            self._power_off_for(problem)
            return False
        try:
            slot, reason = await anyio.to_thread.run_sync(self._boot_sync)
        except (BootEnvError, SimError) as e:
            log.error("boot %d failed: %s", self.state.boot_count, e)
            self._update(error=str(e), boot_reason=f"boot failed: {e}")
            await anyio.to_thread.run_sync(self.device.unmount_all)
            return False
        log.info("boot %d: %s", self.state.boot_count, reason)
        self._update(slot=slot, boot_reason=reason)
        return True

    async def _stop_everything(self, *, graceful: bool) -> None:
        """Stop the server (politely if graceful), kill every marked process, unmount."""
        self.stopping = True
        server = self.server
        if graceful and server is not None and server.returncode is None:
            try:
                server.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            with anyio.move_on_after(STOP_TIMEOUT):
                await server.wait()
            if server.returncode is None:
                log.warning("server (pid %d) did not stop within %s s; killing", server.pid, STOP_TIMEOUT)
        killed = await anyio.to_thread.run_sync(kill_marked_processes, self.dir)
        if killed:
            log.info("killed %s", killed)
        if server is not None:
            with anyio.move_on_after(5):
                await server.wait()
        self.server = None
        await anyio.to_thread.run_sync(self.device.unmount_all)
        self.stopping = False

    # --- the server service

    async def _supervise_server(self) -> None:
        """Start the server and keep it running (Restart=always) until cancelled."""
        first = True
        while True:
            if not first:
                await anyio.sleep(RESTART_DELAY)
                self._update(server_restarts=self.state.server_restarts + 1)
            first = False
            command = self._command()
            try:
                self.server = await anyio.open_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=None,
                    stderr=None,
                    env=self._environment(),
                    cwd=str(self.dir),
                    start_new_session=True,  # a service: not in the terminal's process group
                )
            except OSError as e:
                log.error("cannot start the server %s: %s", command, e)
                self._update(state="up", server_pid=None, ready=False, error=f"cannot start the server: {e}")
                continue
            log.info("server started (pid %d)", self.server.pid)
            self._update(state="up", server_pid=self.server.pid, ready=False, status=None)
            status = await self.server.wait()
            if self.stopping:
                return
            self._update(server_pid=None, ready=False)
            if status in RESTART_PREVENT_EXIT_STATUS:
                # Its own message is in the log just above; say who holds the port if we can.
                found = await anyio.to_thread.run_sync(self._ports_in_use)
                self._power_off_for(
                    f"the server (pid {self.server.pid}) cannot listen (exit status {status}); not restarting it"
                    + (f": {found}" if found else "")
                )
                return
            log.warning("server (pid %d) exited with status %s; restarting", self.server.pid, status)

    async def _listen_notify(self) -> None:
        assert self.notify is not None
        while True:
            pid, text = await self.notify.receive()
            server_pid = self.state.server_pid
            if pid is not None and pid != server_pid:
                log.warning("ignoring sd_notify message from pid %s (the server is pid %s): %r", pid, server_pid, text)
                continue
            log.info("sd_notify from the server: %s", text.replace("\n", " | "))
            changes: dict[str, Any] = {}
            for line in text.splitlines():
                if line == "READY=1":
                    changes["ready"] = True
                elif line.startswith("STATUS="):
                    changes["status"] = line.removeprefix("STATUS=")
            if changes:
                self._update(**changes)

    async def _watch_owner(self, fd: int) -> None:
        """Power off once the owner is gone: the pipe's write end closes with its last holder."""
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, 512)
            except BlockingIOError:
                continue
            if not data:
                break
        log.warning("the machine's owner (pid %d) is gone; powering off", self.owner.pid)
        assert self.requests is not None
        try:
            self.requests.send_nowait(POWER_OFF)
        except anyio.WouldBlock:
            log.warning("too many pending requests; cannot queue the power-off")

    async def _watch_signals(
        self, requests: MemoryObjectSendStream[str], *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        with anyio.open_signal_receiver(*_SIGNAL_REQUESTS) as signals:
            task_status.started()
            async for signum in signals:
                request = _SIGNAL_REQUESTS[signum]
                log.info("%s requested (%s)", request, signal.Signals(signum).name)
                try:
                    requests.send_nowait(request)
                except anyio.WouldBlock:
                    log.warning("too many pending requests; ignoring %s", request)

    async def _until_request(self, requests: MemoryObjectReceiveStream[str], *, serve: bool) -> str:
        async with anyio.create_task_group() as tg:
            if serve:
                tg.start_soon(self._supervise_server)
            request = await requests.receive()
            self.stopping = True
            tg.cancel_scope.cancel()
        return request

    async def _main(self, requests: MemoryObjectReceiveStream[str]) -> None:
        failed = 0
        while True:
            booted = await self._boot()
            if booted:
                failed = 0
                request = await self._until_request(requests, serve=True)
            elif self.fatal is not None:
                request = POWER_OFF  # a taken port (_power_off_for): no retry, no watchdog reset
            else:
                failed += 1
                if failed < MAX_FAILED_BOOTS:
                    pending: str | None = None
                    with anyio.move_on_after(WATCHDOG_DELAY):  # then the watchdog resets the board
                        pending = await requests.receive()
                    if pending is None:
                        continue
                    request = pending
                else:
                    log.error("%d boots in a row failed; halting", failed)
                    self._update(state="halted")
                    request = await self._until_request(requests, serve=False)
                failed = 0
            if self.fatal is not None:
                request = POWER_OFF  # whatever else was asked first: booting again cannot help
            self._update(state="stopping" if request == POWER_OFF else "rebooting", ready=False)
            await self._stop_everything(graceful=request != POWER_CUT)
            if request == POWER_CUT:  # the reboot parameter lives in RAM (/run): a power cut loses it
                (self.device.path / REBOOT_PARAM).unlink(missing_ok=True)
            self._update(server_pid=None)
            if request == POWER_OFF:
                return

    async def run(self) -> int:
        self.owner = claim(self.dir)  # a device a live test set up stays that test's
        self.device.make_runtime_dirs()
        self.device.prepare_app_user()
        lock = open(self.dir / MACHINE_LOCK, "w")  # held for the machine's life: how it is found
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise MachineError(f"a simulated machine is already running for {self.dir}") from None
            self.notify = NotifySocket(self.dir)
            send, receive = anyio.create_memory_object_stream[str](16)
            self.requests = send
            stopped = False
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(self._watch_signals, send)
                    tg.start_soon(self._listen_notify)
                    if self.owner_fd is not None:
                        tg.start_soon(self._watch_owner, self.owner_fd)
                    try:
                        await self._main(receive)
                        stopped = True
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    if not stopped:  # something broke: make sure nothing of the device keeps running
                        await self._stop_everything(graceful=False)
                    await anyio.to_thread.run_sync(self.device.detach)
                    self._update(state="off", ready=False, server_pid=None)
                self.notify.close()
            log.info("powered off")
            return 0 if self.fatal is None else 1  # the error itself was logged once, when it happened
        finally:
            lock.close()


async def run_machine(
    device_dir: Path, *, server_command: Sequence[str] | None = None, owner_fd: int | None = None
) -> int:
    """Run the machine of the device at ``device_dir`` until it is powered off (or, with
    ``owner_fd``, until that pipe's write end is closed: its owner died)."""
    if owner_fd is not None:
        try:
            os.set_inheritable(owner_fd, False)  # the server and the app must not keep it open
            os.set_blocking(owner_fd, False)
        except OSError as e:
            raise MachineError(f"--owner-fd {owner_fd}: {e.strerror}") from None
    machine = Machine(SimDevice.open(device_dir), server_command=server_command, owner_fd=owner_fd)
    return await machine.run()
