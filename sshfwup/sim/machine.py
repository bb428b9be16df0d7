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
``D/machine.json`` (atomically replaced) for ``SimMachine``, the CLI and humans.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from sshfwup.boot.bootenv import BootEnv, BootEnvError
from sshfwup.system.fsutil import write_atomically
from sshfwup.sim.bootloader import boot
from sshfwup.system.ports import port_problem
from sshfwup.sim.device import (
    MACHINE_LOCK,
    MARKER_ENV,
    OWNER_ENV,
    SimDevice,
    SimError,
    claim,
    cleanup,
    current_owner,
    kill_marked_processes,
    machine_pids,
)

log = logging.getLogger(__name__)

__all__ = [
    "MachineError",
    "MachineState",
    "SimMachine",
    "power_cut_machine",
    "reboot_machine",
    "run_machine",
]

STATE_FILE = "machine.json"
LOG_FILE = "machine.log"
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


class MachineError(Exception):
    """The simulated machine could not be started, reached, or did not reach a state in time."""


@dataclass(frozen=True)
class MachineState:
    """The contents of ``D/machine.json``."""

    pid: int
    state: str  # booting | up | rebooting | halted (nothing boots) | stopping | off
    boot_count: int = 0
    slot: str | None = None
    server_pid: int | None = None
    server_restarts: int = 0
    ready: bool = False
    status: str | None = None
    boot_reason: str = ""
    error: str | None = None

    @classmethod
    def read(cls, device_dir: Path) -> MachineState | None:
        """The last state written, or None when there is none (or it is unreadable)."""
        try:
            raw = json.loads((Path(device_dir) / STATE_FILE).read_text())
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**known)
        except (OSError, ValueError, TypeError):
            return None


def _write_state(device_dir: Path, state: MachineState) -> None:
    # Not durable: the machine's state is rewritten often and means nothing after a host crash.
    write_atomically(device_dir / STATE_FILE, json.dumps(asdict(state), indent=2, sort_keys=True) + "\n", durable=False)


# --- the machine process ---------------------------------------------------------------------


class _NotifySocket:
    """The service manager's end of sd_notify: a datagram socket that learns each sender's pid."""

    def __init__(self, device_dir: Path) -> None:
        path = device_dir / "machine.notify"
        if len(os.fsencode(path)) >= 100:  # sun_path holds 108 bytes; stay clear of it
            path = Path("/tmp") / f"sshfwup-sim-{os.getpid()}.notify"
        self.path = path
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    async def receive(self) -> tuple[int | None, str]:
        """(sender pid, message text) of the next datagram."""
        creds_size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while True:
            await anyio.wait_readable(self.sock)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, creds_size)
            except BlockingIOError:
                continue
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
            return pid, data.decode(errors="replace")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


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
        self.notify: _NotifySocket | None = None
        self.requests: MemoryObjectSendStream[str] | None = None
        self.fatal: str | None = None  # why the machine powered itself off (a taken port)

    # --- state

    def _update(self, **changes: Any) -> None:
        self.state = MachineState(**{**asdict(self.state), **changes})
        _write_state(self.dir, self.state)

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
        choice = boot(BootEnv(self.device.fw_env_config))
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
            self.notify = _NotifySocket(self.dir)
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


# --- reaching a running machine --------------------------------------------------------------


def _machine_pid(device_dir: Path) -> int:
    device_dir = Path(device_dir).resolve()
    pids = machine_pids(device_dir)
    if not pids:
        raise MachineError(f"no simulated machine is running for {device_dir}")
    return pids[0]


def reboot_machine(device_dir: Path) -> None:
    """Ask the running machine to reboot (the device's reboot command)."""
    os.kill(_machine_pid(device_dir), signal.SIGUSR1)


def power_cut_machine(device_dir: Path) -> None:
    os.kill(_machine_pid(device_dir), signal.SIGUSR2)


def power_off_machine(device_dir: Path) -> None:
    os.kill(_machine_pid(device_dir), signal.SIGTERM)


# --- the handle for tests ------------------------------------------------------------------


class SimMachine:
    """A machine running as a subprocess (``python -m sshfwup.sim run D``), driven by a test.

    ``async with SimMachine.start(D) as machine:`` always powers off and cleans up at the end.
    If this process dies first — however: SIGKILL, a crash — the machine powers itself off:
    it watches a pipe whose write end only this process holds (``--owner-fd``). A pipe rather
    than ``PR_SET_PDEATHSIG``: that fires when the *thread* that forked exits (a worker thread
    that started the machine), and an EOF cannot be missed or raced the way a signal sent before
    the child set it up can. The machine and everything under it also carry this process as
    their owner (``OWNER_ENV``, ``R/owner.json``), so a later run can tell they were ours.
    """

    def __init__(
        self, device_dir: Path, process: subprocess.Popen[bytes], log_path: Path, owner_pipe: int | None = None
    ) -> None:
        self.dir = device_dir
        self.process = process
        self.log_path = log_path
        self._owner_pipe = owner_pipe  # the write end: closing it powers the machine off

    @classmethod
    def start(cls, device_dir: Path, *, server_command: Sequence[str] | None = None) -> SimMachine:
        device_dir = Path(device_dir).resolve()
        SimDevice.open(device_dir)  # fail here, not in the subprocess, for a wrong directory
        (device_dir / STATE_FILE).unlink(missing_ok=True)  # a stale state must not satisfy a wait
        # Both ends are close-on-exec (PEP 446): no other child of ours inherits the write end
        # (it would keep the machine alive after we die); pass_fds hands the machine the read end.
        read_end, write_end = os.pipe()
        argv = [sys.executable, "-m", "sshfwup.sim", "run", str(device_dir), "--owner-fd", str(read_end)]
        if server_command:
            argv += ["--server-command", json.dumps(list(server_command))]
        env = dict(os.environ)
        env[OWNER_ENV] = current_owner().token
        log_path = device_dir / LOG_FILE
        try:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    pass_fds=(read_end,), start_new_session=True,  # not killed by the terminal's Ctrl-C
                )  # fmt: skip
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(device_dir, process, log_path, write_end)

    def state(self) -> MachineState | None:
        return MachineState.read(self.dir)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def _wait_for(self, predicate: Callable[[MachineState], bool], timeout: float, what: str) -> MachineState:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state is not None and state.pid == self.process.pid and predicate(state):
                return state
            if self.process.poll() is not None:
                state = self.state() or state
                if state is not None and state.pid == self.process.pid and state.error:
                    # one clear message first (a taken port), the log for the details
                    raise MachineError(
                        f"the machine powered off (status {self.process.returncode}) before {what}: {state.error}\n"
                        f"{self.log_tail()}"
                    )
                raise MachineError(
                    f"the machine exited (status {self.process.returncode}) before {what}; state {state}\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise MachineError(f"timed out after {timeout:g} s waiting for {what}; state {state}\n{self.log_tail()}")
            await anyio.sleep(0.05)

    async def wait_up(self, timeout: float = 20.0) -> MachineState:
        """Until the machine is up and the server has sent READY=1."""
        return await self._wait_for(lambda s: s.state == "up" and s.ready, timeout, "the machine to be up and ready")

    async def wait_boot(self, count: int, timeout: float = 20.0, *, ready: bool = True) -> MachineState:
        """Until boot number ``count`` (or a later one) is up (and ready, unless ready=False)."""
        return await self._wait_for(
            lambda s: s.boot_count >= count and s.state == "up" and (s.ready or not ready),
            timeout,
            f"boot {count}",
        )

    async def wait_state(self, predicate: Callable[[MachineState], bool], timeout: float = 20.0) -> MachineState:
        return await self._wait_for(predicate, timeout, "the expected machine state")

    def _signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is not None:
            raise MachineError(f"the machine has exited (status {self.process.returncode})")
        os.kill(self.process.pid, sig)

    def reboot(self) -> None:
        self._signal(signal.SIGUSR1)

    def power_cut(self) -> None:
        self._signal(signal.SIGUSR2)

    def kill_server(self) -> int:
        """SIGKILL the server only (the machine restarts it); returns the pid killed."""
        state = self.state()
        if state is None or state.server_pid is None:
            raise MachineError(f"no server is running; state {state}")
        os.kill(state.server_pid, signal.SIGKILL)
        return state.server_pid

    async def power_off(self, timeout: float = 30.0) -> int:
        """SIGTERM the machine and wait for it to exit; returns its exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.process.poll() is None:
                if time.monotonic() > deadline:
                    self.process.kill()
                    self.process.wait()
                    raise MachineError(f"the machine did not power off within {timeout:g} s\n{self.log_tail()}")
                await anyio.sleep(0.05)
        return self.process.returncode

    async def __aenter__(self) -> SimMachine:
        return self

    def _close_owner_pipe(self) -> None:
        if self._owner_pipe is not None:
            os.close(self._owner_pipe)
            self._owner_pipe = None

    async def __aexit__(self, *exc: object) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self.power_off()
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._close_owner_pipe()
            await anyio.to_thread.run_sync(cleanup, self.dir)
