"""Driving a simulated machine from outside: signals to the machine of a device directory
(the device's reboot command), and ``SimMachine``, the handle of a machine a test runs as a
subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio

from sshfwup.sim.device import OWNER_ENV, SimDevice, cleanup, current_owner, machine_pids
from sshfwup.sim.machine_state import STATE_FILE, MachineError, MachineState

__all__ = ["LOG_FILE", "SimMachine", "power_cut_machine", "power_off_machine", "reboot_machine"]

LOG_FILE = "machine.log"


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
