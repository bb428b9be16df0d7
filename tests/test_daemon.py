"""``sshfwup serve``: a clean stop of the app on shutdown, and start-up errors as one message."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from conftest import Sim, assert_applied, journal, output, upload, wait_until

from sshfwup.cli import _use_uvloop, operator_errors
from sshfwup.daemon import DaemonError
from sshfwup.update.lock import DeviceBusy, DeviceLock
from sshfwup.supervisor.supervisor import SupervisorError


async def test_a_reboot_stops_the_app_politely(sim: Sim) -> None:
    pid = sim.app()["pid"]
    sim.machine.reboot()
    await sim.machine.wait_boot(2, timeout=60)
    log = sim.machine.log_path.read_text(errors="replace")
    # The app got SIGTERM, drained, and exited on its own — not SIGKILLed by a cancelled task.
    assert re.search(rf"INFO app 1\.0\.0\[{pid}\]: .*drained; exiting", log), log[-3000:]
    assert "1.0.0 stopped (exited with status 0)" in log, log[-3000:]
    assert "was killed by SIGKILL" not in log


def _write_config(tmp_path: Path, **device: str) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    lines = [
        "[server]",
        'listen = "127.0.0.1"',
        "port = 2",
        f'host_key = "{tmp_path}/host_key"',
        f'authorized_keys = ["{tmp_path}/authorized_keys"]',
        f'data_dir = "{tmp_path}/data"',
        f'run_dir = "{tmp_path}/run"',
        f'lock_file = "{tmp_path}/run/update.lock"',
        "[device]",
        f'root_mount = "{root}"',
        *(f'{key} = {value}' for key, value in device.items()),
    ]
    path = tmp_path / "sshfwup.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_wrong_slot_setting_is_one_message_not_a_traceback(tmp_path: Path) -> None:
    config = _write_config(tmp_path, slots='{ a = "/dev/sshfwup-test-none-1", b = "/dev/sshfwup-test-none-2" }')
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sshfwup", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        "sshfwup serve: cannot tell which slot is running: neither slot (a = /dev/sshfwup-test-none-1, "
        f"b = /dev/sshfwup-test-none-2) is mounted at {tmp_path}/root ([device] slots and root_mount must name "
        "the running root's block device and where it is mounted; see the mount table, /proc/self/mountinfo)"
    ], result.stderr
    assert time.monotonic() - started < 30


def test_a_bad_config_value_is_exit_2(tmp_path: Path) -> None:
    config = _write_config(tmp_path, slots='{ a = "/dev/x" }')
    result = subprocess.run(
        [sys.executable, "-m", "sshfwup", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stderr.startswith("sshfwup serve: "), result.stderr
    assert "slots" in result.stderr and "Traceback" not in result.stderr


def test_operator_errors_are_told_apart_from_bugs() -> None:
    group = BaseExceptionGroup("x", [ExceptionGroup("y", [SupervisorError("port 8080 is in use")]), OSError(98, "in use")])
    assert sorted(operator_errors(group) or []) == ["[Errno 98] in use", "port 8080 is in use"]
    assert operator_errors(DaemonError("cannot tell")) == ["cannot tell"]
    assert operator_errors(ExceptionGroup("z", [SupervisorError("a"), RuntimeError("bug")])) is None
    assert operator_errors(KeyError("bug")) is None



# --- SSH stays up, whatever else is broken at start ---------------------------------------------


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


async def test_an_unreadable_boot_env_at_start_keeps_ssh_and_the_app_up(sim: Sim, tmp_path: Path) -> None:
    broken = _script(tmp_path / "fw_printenv", "echo 'Cannot read environment, CRC error' >&2\nexit 1\n")
    await sim.restart_server(device={"fw_printenv": broken})
    status = sim.status()
    assert "Cannot read environment" in status["boot_env_error"]
    assert status["app"]["version"] == "unknown" and sim.app()["version"] == "1.0.0"
    assert "unreadable" in output(sim.ssh("status"))


async def test_a_damaged_journal_or_host_key_keeps_ssh_up(sim: Sim) -> None:
    data = sim.device.server_data_dir
    (data / "journal.json").write_text("null\n")
    key = data / "ssh_host_ed25519_key"
    key.write_bytes(b"")
    await sim.restart_server()
    status = sim.status()  # the client accepts any host key here: the new one
    assert status["app"]["version"] == "1.0.0" and status["journal"] is None
    assert key.stat().st_size > 0 and key.stat().st_mode & 0o777 == 0o600
    assert list(data.glob("ssh_host_ed25519_key.damaged-*"))
    log = sim.machine.log_path.read_text(errors="replace")
    assert re.search(r"ERROR sshfwup\.ssh\.server: host key \S+ssh_host_ed25519_key is damaged", log), log[-2000:]


async def test_an_unwritable_data_partition_still_takes_a_fix(sim: Sim, firmware) -> None:
    data = sim.device.server_data_dir
    subprocess.run(["chattr", "+i", str(data)], check=True)  # nothing can be created or renamed in it
    try:
        result = await anyio.to_thread.run_sync(lambda: sim.upload(firmware("2.0.0")))
        assert result.returncode == 0 and "hot reload" in output(result), output(result)
        status = sim.status()
        assert status["journal_error"] and status["app"]["version"] == "2.0.0"
        assert "NOT WRITTEN" in output(sim.ssh("status"))
    finally:
        subprocess.run(["chattr", "-i", str(data)], check=True)


async def test_a_failed_first_boot_reboots_even_when_the_env_cannot_be_written(sim: Sim, firmware, tmp_path: Path) -> None:
    """The fallback's env write fails: the device reboots anyway, and the bootloader's boot counter
    brings back the validated firmware after its attempts run out."""
    setenv = _script(tmp_path / "fw_setenv",
                     'in=$(cat)\ncase "$in" in *nerves_fw_active=*) echo "I/O error" >&2; exit 1;; esac\n'
                     'printf "%s\\n" "$in" | exec fw_setenv "$@"\n')  # fmt: skip
    await sim.restart_server(device={"fw_setenv": setenv}, app={"ready_timeout": 2, "observe": 1})
    result = await anyio.to_thread.run_sync(
        lambda: sim.upload(firmware("3.0.0", changes=("kernel",), app_behavior={"never_ready": True})))
    assert result.returncode == 0, output(result)  # a reboot verdict: the new app is judged after the boot
    state = await sim.machine.wait_state(lambda s: s.slot == "a" and s.boot_count >= 3 and s.ready, timeout=120)
    assert state.slot == "a" and sim.app()["version"] == "1.0.0"


# --- health is proved, not announced ------------------------------------------------------------


@pytest.mark.parametrize("sim_config", [{"app": {"observe": 0.5, "restart_backoff": [0.2, 5]}}])
async def test_a_hot_swapped_version_that_crash_loops_after_its_window_goes_back_to_the_running_root(
    sim: Sim, firmware
) -> None:
    """The issue's reproduction: crashes a while after start (after the observation window), and
    was restarted forever from the new slot — with the boot env still naming it."""
    result = await upload(sim, firmware("2.0.0", app_behavior={"crash_after": 1.5}))
    assert result.returncode == 0 and "hot reload: 1.0.0 → 2.0.0" in output(result), output(result)
    await wait_until(lambda: journal(sim)["stage"] == "rolled-back", timeout=30, what="the crash-loop rollback")
    await wait_until(lambda: sim.app()["version"] == "1.0.0", what="1.0.0 serving again")
    assert sim.app()["slot"] == "a"
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1", env
    assert env["b.sshfwup_state"] == "rolled-back"
    verdict = (
        "2.0.0 from slot b failed 3 times in a row after its hot swap (last: it exited with status 3);"
        " rolled back: 1.0.0 runs from slot a again; boot env reverted to slot a"
    )
    assert journal(sim)["verdict"] == verdict
    status = sim.status()
    assert status["last_update"] == {"ok": False, "verdict": verdict}
    assert not status["pending_reboot"] and status["app"]["slot"] == "a"
    assert f"last update:    FAILED: {verdict}" in output(sim.ssh("status"))
    assert verdict in output(sim.ssh("logs"))
    assert not [m for m in Path("/proc/self/mountinfo").read_text().split() if str(sim.device.run_dir / "slots") in m]
    good = await upload(sim, firmware("2.0.1"))
    assert good.returncode == 0, output(good)
    assert sim.app()["version"] == "2.0.1" and "b.sshfwup_state" not in sim.env()


@pytest.mark.parametrize("sim_config", [{"app": {"observe": 1}}])
async def test_boot_validation_probes_the_app_right_before_it_validates(sim: Sim, firmware) -> None:
    """Healthy through its observation window, no longer when the validation got the update lock
    (held here by an operator's tool): the firmware is not validated, the device falls back."""
    fw = firmware("3.0.0", changes=("system-file",), app_behavior={"stop_accepting_after": 2.5})
    result = await upload(sim, fw)
    assert result.returncode == 0 and "reboot required" in output(result), output(result)
    lock = DeviceLock(sim.device.run_dir / "update.lock")
    await wait_until(lambda: _acquired(lock), what="the update lock")
    try:
        await sim.machine.wait_boot(2, timeout=60)
        assert sim.app()["version"] == "3.0.0"
        await wait_until(lambda: not _answers(sim), what="3.0.0 to stop accepting")
        assert sim.env()["nerves_fw_validated"] == "0"  # the validation waits for the lock
    finally:
        lock.release()
    state = await sim.machine.wait_boot(3, timeout=60)
    assert state.slot == "a"
    await wait_until(lambda: sim.app()["version"] == "1.0.0", what="1.0.0 serving again")
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1" and env["b.sshfwup_state"] == "rolled-back"
    log = sim.machine.log_path.read_text(errors="replace")
    assert "firmware 3.0.0 failed its first boot (3.0.0 stopped accepting connections on its public socket http" in log


def _acquired(lock: DeviceLock) -> bool:
    try:
        lock.acquire("test: an operator's tool")
    except DeviceBusy:
        return False
    return True


def _answers(sim: Sim) -> bool:
    try:
        sim.app(timeout=0.5)
    except OSError:
        return False
    return True


# --- the optional uvloop event loop (issue 13) ------------------------------------------------


async def test_serve_on_uvloop_hot_swaps_an_update(sim: Sim, firmware) -> None:
    """fwup's pipes, the app's sockets handed over with pass_fds, signals: all on uvloop's loop."""
    await sim.restart_server(server={"event_loop": "uvloop"})
    assert "event loop: uvloop" in sim.machine.log_path.read_text(errors="replace")
    result = await upload(sim, firmware("2.0.0"))
    assert_applied(sim, result)
    assert sim.app()["version"] == "2.0.0"


def test_a_missing_uvloop_falls_back_to_asyncio(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An optional speed-up missing on the device must not keep SSH down: a warning, asyncio."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop → ImportError
    assert _use_uvloop("uvloop") is False
    assert "uvloop cannot be imported" in caplog.text and "serving with asyncio" in caplog.text
    assert _use_uvloop("asyncio") is False
    monkeypatch.delitem(sys.modules, "uvloop")
    assert _use_uvloop("uvloop") is True
