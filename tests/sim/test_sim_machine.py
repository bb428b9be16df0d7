"""The simulated machine, with a stub in place of the server: boot, restart, reboot, power."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshfwup.config import load_config
from sshfwup.sim.device import (
    MARKER_ENV,
    SimDevice,
    cleanup,
    loop_devices,
    machine_pids,
    marked_processes,
    mounts,
)
from sshfwup.sim.layout import DEFAULT_LAYOUT
from sshfwup.sim.machine import MachineError, MachineState, SimMachine
from sshfwup.sim.rootfs import build_sample_firmware

# A stand-in for `sshfwup serve`: reports its environment, starts a grandchild in its own session
# (only the machine's marker can find it), says READY=1 (or has a child say it), and records
# whether it was asked to stop politely.
STUB_SERVER = r'''
import json, os, signal, socket, subprocess, sys, time
device, mode = sys.argv[1], sys.argv[2]
me = os.getpid()
def stop(*_):
    open(os.path.join(device, f"stub-{me}.terminated"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
child = subprocess.Popen(["sleep", "300"], start_new_session=True)
with open(os.path.join(device, f"stub-{me}.json"), "w") as f:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "grandchild": child.pid}, f)
def notify(text):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(text.encode(), os.environ["NOTIFY_SOCKET"])
if mode == "ready":
    notify(f"READY=1\nSTATUS=stub {me} serving")
elif mode == "child-notifies":
    subprocess.run([sys.executable, "-c", "import os, socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)"
                    ".sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])"], check=True)
    notify("STATUS=parent never said ready")
while True:
    time.sleep(1)
'''


@pytest.fixture(scope="session")
def firmware_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sample_firmware(tmp_path_factory.mktemp("fw"), version="1.0.0")


@pytest.fixture
def device(tmp_path: Path, firmware_v1: Path) -> Iterator[SimDevice]:
    path = tmp_path / "dev"
    try:
        yield SimDevice.create(path, firmware=firmware_v1, ssh_port=2211, app_port=8211)
    finally:
        cleanup(path)


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    script = tmp_path / "stub_server.py"
    script.write_text(STUB_SERVER)
    return script


def stub_command(stub: Path, mode: str = "ready") -> list[str]:
    return [sys.executable, str(stub), "{device}", mode]


def stub_report(device: SimDevice, pid: int) -> dict:
    return json.loads((device.path / f"stub-{pid}.json").read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def mounted_under(path: Path) -> list[Path]:
    return [m.mount_point for m in mounts() if m.mount_point == path or path in m.mount_point.parents]


def copy_slot_a_to_b(device: SimDevice) -> None:
    offset_a, size = DEFAULT_LAYOUT.slot_span("a")
    offset_b, _ = DEFAULT_LAYOUT.slot_span("b")
    with open(device.disk, "r+b") as f:
        f.seek(offset_a)
        data = f.read(size)
        f.seek(offset_b)
        f.write(data)


async def test_boots_slot_a_and_records_ready(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        state = await machine.wait_up()
        assert (state.state, state.boot_count, state.slot, state.ready) == ("up", 1, "a", True)
        assert state.status == f"stub {state.server_pid} serving"
        assert state.boot_reason == "booting slot a"
        assert state.server_restarts == 0

        report = stub_report(device, state.server_pid)
        assert report["env"][MARKER_ENV] == str(device.path)
        assert report["env"]["NOTIFY_SOCKET"]
        assert report["cwd"] == str(device.path)
        assert device.running_slot() == "a"
        assert (device.root_dir / "srv/app/VERSION").read_text() == "1.0.0\n"
        assert (device.data_dir / "sshfwup/authorized_keys").exists()
        slots = dict(load_config(device.config_path).device.slots)
        assert slots == {"a": Path(device.slot_device("a")), "b": Path(device.slot_device("b"))}
        assert device.env()["nerves_fw_booted"] == "1"


async def test_server_is_restarted_after_kill_9(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        first = await machine.wait_up()
        killed = machine.kill_server()
        assert killed == first.server_pid
        state = await machine.wait_state(lambda s: s.server_restarts == 1 and s.ready)
        assert state.server_pid != killed
        assert state.boot_count == 1  # restarted, not rebooted


async def test_reboot_command_boots_again_and_kills_everything(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        first = await machine.wait_up()
        grandchild = stub_report(device, first.server_pid)["grandchild"]
        assert alive(grandchild)

        # the device's own reboot command, as the server would run it
        reboot_command = load_config(device.config_path).device.reboot_command
        subprocess.run(list(reboot_command), check=True, timeout=30)

        second = await machine.wait_boot(2)
        assert second.slot == "a" and second.server_pid != first.server_pid
        assert (device.path / f"stub-{first.server_pid}.terminated").exists()  # asked politely first
        assert not alive(grandchild)
        assert not alive(first.server_pid)


async def test_power_cut_kills_without_asking(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        first = await machine.wait_up()
        grandchild = stub_report(device, first.server_pid)["grandchild"]
        machine.power_cut()
        second = await machine.wait_boot(2)
        assert second.server_pid != first.server_pid
        assert not (device.path / f"stub-{first.server_pid}.terminated").exists()
        assert not alive(grandchild)


async def test_unvalidated_firmware_falls_back_after_bootlimit(device: SimDevice, stub: Path) -> None:
    copy_slot_a_to_b(device)
    device.set_env(nerves_fw_active="b", nerves_fw_validated="0", upgrade_available="1", bootcount="0")
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        slots = []
        for boot in range(1, 5):
            if boot > 1:
                machine.reboot()
            state = await machine.wait_boot(boot)
            slots.append(state.slot)
        assert slots == ["b", "b", "b", "a"]
        assert "falling back to slot a" in state.boot_reason
        env = device.env()
        assert (env["nerves_fw_active"], env["nerves_fw_validated"], env["upgrade_available"], env["bootcount"]) == (
            "a", "1", "0", "0",
        )


async def test_unbootable_new_slot_falls_back_by_itself(device: SimDevice, stub: Path) -> None:
    # slot b holds no filesystem: each boot fails, the watchdog resets, the counter runs out
    device.set_env(nerves_fw_active="b", nerves_fw_validated="0", upgrade_available="1", bootcount="0")
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        state = await machine.wait_up(timeout=30)
        assert (state.boot_count, state.slot) == (4, "a")
        assert "falling back to slot a" in state.boot_reason
        assert device.env()["nerves_fw_active"] == "a"


async def test_machine_halts_when_nothing_boots_and_still_powers_off(device: SimDevice, stub: Path) -> None:
    device.set_env(nerves_fw_active="b", upgrade_available="0")  # validated but empty: no fallback
    machine = SimMachine.start(device.path, server_command=stub_command(stub))
    async with machine:
        state = await machine.wait_state(lambda s: s.state == "halted", timeout=30)
        assert state.boot_count == 5 and state.error and "mounting slot b" in state.error
        assert await machine.power_off() == 0
        assert mounted_under(device.path) == []


async def test_notifications_from_other_processes_are_ignored(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub, "child-notifies")) as machine:
        state = await machine.wait_state(lambda s: s.status == "parent never said ready")
        assert state.ready is False
        assert "ignoring sd_notify message" in machine.log_path.read_text()


async def test_power_off_cleans_up(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        state = await machine.wait_up()
        grandchild = stub_report(device, state.server_pid)["grandchild"]
        assert await machine.power_off() == 0
        final = MachineState.read(device.path)
        assert final is not None and (final.state, final.ready, final.server_pid) == ("off", False, None)
        assert mounted_under(device.path) == []
        assert loop_devices(device.disk) == []
        assert marked_processes(device.path) == []
        assert not alive(grandchild)
        assert (device.path / f"stub-{state.server_pid}.terminated").exists()


async def test_second_machine_for_the_same_device_is_refused(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        await machine.wait_up()
        second = subprocess.run(
            [sys.executable, "-m", "sshfwup.sim", "run", str(device.path)], capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1
        assert "already running" in second.stderr
        assert (await machine.wait_up()).boot_count == 1  # the first one is untouched


async def test_machine_that_cannot_start_reports_it(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="not a simulated device"):
        SimMachine.start(tmp_path)


async def test_wait_fails_clearly_when_the_server_never_gets_ready(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub, "silent")) as machine:
        with pytest.raises(MachineError, match="timed out after 1 s"):
            await machine.wait_up(timeout=1)


async def test_power_off_via_sigint_like_ctrl_c(device: SimDevice, stub: Path) -> None:
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        await machine.wait_up()
        os.kill(machine.process.pid, 2)
        state = await machine.wait_state(lambda s: s.state == "off")
        assert state.server_pid is None
        assert machine.process.wait(10) == 0


async def test_machine_started_by_the_top_level_cli_is_found_by_reboot_and_cleanup(
    device: SimDevice, stub: Path
) -> None:
    # `sshfwup sim run dev` with a relative path: found through its lock, not its command line
    command = json.dumps(stub_command(stub))
    process = subprocess.Popen(
        [sys.executable, "-m", "sshfwup", "sim", "run", "dev", "--server-command", command],
        cwd=device.path.parent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        handle = SimMachine(device.path, process, device.path / "machine.log")
        await handle.wait_up()
        assert machine_pids(device.path) == [process.pid]
        rebooted = subprocess.run(
            [sys.executable, "-m", "sshfwup", "sim", "reboot", str(device.path)], capture_output=True, text=True
        )
        assert rebooted.returncode == 0, rebooted.stderr
        await handle.wait_boot(2)
        cleanup(device.path)  # kills the machine like a crashed test run would need
        assert process.wait(10) == -9
        assert machine_pids(device.path) == [] and marked_processes(device.path) == []
        assert mounted_under(device.path) == [] and loop_devices(device.disk) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_power_off_is_honoured_between_failing_boots(device: SimDevice, stub: Path) -> None:
    device.set_env(nerves_fw_active="b", upgrade_available="0")  # every boot fails
    async with SimMachine.start(device.path, server_command=stub_command(stub)) as machine:
        await machine.wait_state(lambda s: s.boot_count >= 1 and s.error is not None)
        assert await machine.power_off(timeout=5) == 0
        state = machine.state()
        assert state is not None and state.state == "off" and state.boot_count < 5
