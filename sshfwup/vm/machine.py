"""``sshfwup vm run``: QEMU boots the VM directory's disk through U-Boot, on a qcow2 overlay.

- ``-bios u-boot.rom`` (Debian's u-boot-qemu, qemu-x86), TCG with one vCPU (no KVM needed);
- a fresh qcow2 overlay on ``disk.img`` per run (the factory disk is never written), removed at the end;
- user networking, host ports forwarded on 127.0.0.1 only (SSH → 22, app → 8080);
- the serial console to ``run/console.log`` (:func:`follow` shows it live);
- a power cut: QEMU killed (SIGKILL) and started again on the same overlay (:func:`kill_power`);
  the disk is ``cache=writeback``, so what the guest flushed is in the overlay and what it did not
  may be lost, as on a real disk;
- leaving: ``systemctl poweroff`` through the guest agent, then SIGTERM, then SIGKILL; QEMU runs under
  ``setpriv --pdeathsig KILL`` so a killed runner takes it along (:mod:`.leftovers` clears the rest).
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import Process

from sshfwup.vm.agent import AgentError, guest_poweroff
from sshfwup.vm.errors import BootTimeout, VmError
from sshfwup.vm.image import VmDir
from sshfwup.vm.leftovers import clear_run_dir
from sshfwup.vm.tools import RUN_TOOLS, require, uboot_rom

log = logging.getLogger(__name__)

__all__ = [
    "GUEST_APP_PORT", "Running", "VmOptions", "console_tail", "free_port", "kill_power", "power_cut", "run_vm", "wait_booted",
    "wait_ssh",
]  # fmt: skip

GUEST_APP_PORT = 8080
POWEROFF_TIMEOUT = 30.0


@dataclass(frozen=True)
class VmOptions:
    ssh_port: int = 0  # 0: a free port
    app_port: int = 0
    memory_mb: int = 1024
    boot_timeout: float = 240.0  # power-on → sshfwup answering SSH


@dataclass
class Running:
    """A running VM: where to reach it and what it logs. Not frozen: a power cut
    (:func:`kill_power`) replaces the QEMU process and the power-on time."""

    vm: VmDir
    ssh_port: int
    app_port: int
    console: Path
    agent: Path  # the guest agent's socket (sshfwup.vm.agent)
    process: Process
    started: float  # time.monotonic() at power-on
    argv: tuple[str, ...] = ()  # QEMU's command line, to power on again after a cut
    power_cuts: int = 0

    def ssh_argv(self, *command: str) -> list[str]:
        """OpenSSH client argv for this VM (its key, no known_hosts)."""
        return [
            "ssh", "-p", str(self.ssh_port), "-i", str(self.vm.key), "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10", "root@127.0.0.1", *command,
        ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_tail(console: Path, lines: int = 25) -> str:
    try:
        text = console.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return "(no console output)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no console output)"


def _qemu_argv(vm: VmDir, run_dir: Path, opts: VmOptions, ssh_port: int, app_port: int) -> list[str]:
    tools = require(RUN_TOOLS, what="running the VM")
    fwd = f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22,hostfwd=tcp:127.0.0.1:{app_port}-:{GUEST_APP_PORT}"
    return [
        "setpriv", "--pdeathsig", "KILL", "--",
        tools["qemu-system-x86_64"], "-name", f"sshfwup-vm,process=sshfwup-vm",
        "-machine", "pc", "-accel", "tcg", "-smp", "1", "-m", str(opts.memory_mb),
        "-bios", str(uboot_rom()),
        # writeback: the guest's flushes reach the overlay (qcow2 metadata included), so a SIGKILL
        # (kill_power) loses only what the guest had not flushed — a real disk's power cut
        "-drive", f"file={run_dir / 'overlay.qcow2'},if=virtio,format=qcow2,cache=writeback",
        "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-pci,netdev=n0",
        # appended to: the console of every power-on of this run stays in one file
        "-chardev", f"file,id=ser0,path={run_dir / 'console.log'},append=on", "-serial", "chardev:ser0",
        # no VGA: U-Boot's video init runs the VGA BIOS in real mode, which hung a power-on after a
        # SIGKILL (kill_power) for minutes under load; the console is the serial port anyway
        "-vga", "none", "-display", "none", "-monitor", "none",
        "-qmp", f"unix:{run_dir / 'qmp.sock'},server=on,wait=off",  # power_cut()
        # the guest agent (sshfwup.vm.agent): a virtio-serial port on a unix socket
        "-chardev", f"socket,id=qga0,path={run_dir / 'qga.sock'},server=on,wait=off",
        "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-pidfile", str(run_dir / "qemu.pid"),
    ]  # fmt: skip


async def wait_ssh(port: int, deadline: float) -> bool:
    """True once something answers with an SSH banner on 127.0.0.1:port before ``deadline``
    (monotonic). QEMU's port forward accepts at once even while the guest is down: the banner is the sign."""
    while time.monotonic() < deadline:
        try:
            with anyio.fail_after(5):
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    if (await stream.receive(64)).startswith(b"SSH-"):
                        return True
        except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        await anyio.sleep(1)
    return False


async def wait_booted(running: Running, timeout: float) -> float:
    """Until sshfwup answers SSH on the VM powered on at ``running.started``; the seconds since
    power-on. BootTimeout with the console's last lines if not within ``timeout`` of power-on."""
    if not await wait_ssh(running.ssh_port, running.started + timeout):
        raise BootTimeout(f"the VM did not answer SSH within {timeout:.0f} s of power-on; "
                          f"last console lines:\n{console_tail(running.console)}")  # fmt: skip
    return time.monotonic() - running.started


async def power_cut(running: Running) -> None:
    """Cut the power and switch it on again: QEMU's ``system_reset`` (what reached the disk stays;
    the guest's RAM, page cache included, is gone)."""
    try:
        with anyio.fail_after(5):
            async with await anyio.connect_unix(str(running.console.parent / "qmp.sock")) as s:
                await s.receive()  # the greeting
                for msg in (b'{"execute": "qmp_capabilities"}', b'{"execute": "system_reset"}'):
                    await s.send(msg + b"\n")
                    reply = await s.receive()
                    if b'"error"' in reply:
                        raise VmError(f"QMP refused {msg.decode()}: {reply.decode(errors='replace').strip()}")
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as e:
        raise VmError(f"QMP power cut failed: {e or type(e).__name__}") from None


async def _spawn(argv: Sequence[str], run_dir: Path) -> Process:
    with (run_dir / "qemu.log").open("ab") as qemu_log:  # QEMU's own messages, shown if it fails
        # a session of its own: the terminal's Ctrl-C reaches the runner, which powers off cleanly
        return await anyio.open_process(list(argv), stdin=None, stdout=qemu_log, stderr=qemu_log,
                                        start_new_session=True)  # fmt: skip


async def kill_power(running: Running) -> None:
    """A power cut: QEMU killed with SIGKILL (the guest's RAM and every write it had not flushed
    are gone), then powered on again on the same overlay, same ports. Returns once QEMU runs;
    the guest boots from U-Boot as after any power-on."""
    running.process.kill()
    await running.process.wait()
    running.process = await _spawn(running.argv, running.console.parent)
    running.started = time.monotonic()
    running.power_cuts += 1
    log.info("power cut %d: QEMU killed and started again", running.power_cuts)


async def _power_off(process: Process, run_dir: Path, *, graceful: bool) -> None:
    """``systemctl poweroff`` through the guest agent when the VM is up (``graceful``), waited
    for; then SIGTERM, then SIGKILL. (ACPI's power button does nothing here: no logind.)"""
    if process.returncode is None and graceful:
        try:
            await guest_poweroff(run_dir / "qga.sock")
            with anyio.move_on_after(POWEROFF_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                log.warning("the VM did not power off within %.0f s: stopping QEMU", POWEROFF_TIMEOUT)
        except AgentError as e:
            log.warning("%s: stopping QEMU", e)
    if process.returncode is None:
        process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@asynccontextmanager
async def run_vm(vm: VmDir, opts: VmOptions = VmOptions(), *, wait: bool = True) -> AsyncIterator[Running]:
    """Boot ``vm`` on a fresh overlay; yield once SSH answers (``wait``); power off and clean up
    on exit, however it exits. BootTimeout (with the console's last lines) if it does not boot."""
    vm.check_built()
    require(RUN_TOOLS, what="running the VM")
    uboot_rom()
    run_dir = vm.path / "run"
    if clear_run_dir(run_dir):
        log.info("removed what an earlier run of %s left behind", vm.path)
    run_dir.mkdir()
    ssh_port = opts.ssh_port or free_port()
    app_port = opts.app_port or free_port()
    try:
        await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(vm.disk),
                                 str(run_dir / "overlay.qcow2")])  # fmt: skip
        argv = _qemu_argv(vm, run_dir, opts, ssh_port, app_port)
        log.info("starting QEMU: ssh on 127.0.0.1:%d, app on 127.0.0.1:%d", ssh_port, app_port)
        started = time.monotonic()
        process = await _spawn(argv, run_dir)
        booted = False
        running = Running(vm, ssh_port, app_port, run_dir / "console.log", run_dir / "qga.sock", process, started,
                          tuple(argv))  # fmt: skip
        try:
            if wait:
                async with anyio.create_task_group() as tg:
                    ok = False

                    async def watch_exit() -> None:
                        await process.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(watch_exit)
                    ok = await wait_ssh(ssh_port, started + opts.boot_timeout)
                    tg.cancel_scope.cancel()
                if process.returncode is not None:
                    raise VmError(f"QEMU exited with status {process.returncode} before the VM booted:\n"
                                  + console_tail(run_dir / "qemu.log") + "\n" + console_tail(running.console))  # fmt: skip
                if not ok:
                    raise BootTimeout(f"the VM did not answer SSH within {opts.boot_timeout:.0f} s; "
                                      f"last console lines:\n{console_tail(running.console)}")  # fmt: skip
                log.info("VM up: SSH answers after %.1f s", time.monotonic() - started)
            booted = True
            yield running
        finally:
            with anyio.CancelScope(shield=True):
                await _power_off(running.process, run_dir, graceful=booted)
    finally:
        clear_run_dir(run_dir)


async def follow(console: Path) -> None:
    """Copy the console log to stdout as it grows (``--console``), until cancelled."""
    while not console.exists():
        await anyio.sleep(0.2)
    with console.open("rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
            else:
                await anyio.sleep(0.2)
