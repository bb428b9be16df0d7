"""``sshfwup serve``: a clean stop of the app on shutdown, and start-up errors as one message."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import Sim

from sshfwup.cli import operator_errors
from sshfwup.daemon import DaemonError
from sshfwup.supervisor import SupervisorError


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



def test_serve_imports_nothing_of_the_host_side() -> None:
    # 256 MiB boards: the progress bars (tqdm, the `host` extra) and the upload client stay off the device.
    code = (
        "import sys, sshfwup.cli, sshfwup.daemon, sshfwup.server, sshfwup.commands\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tqdm', 'rich')"
        " or m in ('sshfwup.client', 'sshfwup.progress_display')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
