"""Device commands: ``status`` during an update (fields and text), ``logs [-n N] [-f]``."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import SSH_OPTIONS, Sim, output

from sshfwup.boot.bootenv import BootState
from sshfwup.ssh.commands import LogsRequest, UsageError, parse_logs, render_status, status
from sshfwup.config import Config, ServerConfig
from sshfwup.device import Device
from sshfwup.update.update import Uploader

UPLOADER = Uploader("root", "SHA256:abc", "10.0.0.9:40000", "ssh -s fwup")
ENV = {"nerves_fw_active": "a", "nerves_fw_validated": "1", "a.nerves_fw_version": "1.0.0", "b.nerves_fw_version": "0.9.0"}


# --- logs arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        ([], LogsRequest(100, False)),
        (["-f"], LogsRequest(100, True)),
        (["-n", "5"], LogsRequest(5, False)),
        (["-n5", "--follow"], LogsRequest(5, True)),
        (["--lines", "0", "-f"], LogsRequest(0, True)),
        (["-f", "-n", "2000"], LogsRequest(2000, True)),
    ],
)
def test_logs_arguments(args: list[str], expect: LogsRequest) -> None:
    assert parse_logs(args, limit=2000) == expect


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n"], "logs: -n needs a number"),
        (["-n", "x"], "logs: -n takes a number from 0 to 2000, not 'x'"),
        (["-n", "2001"], "logs: -n takes a number from 0 to 2000, not '2001'"),
        (["-n", "-3"], "logs: -n takes a number from 0 to 2000, not '-3'"),
        (["--all"], "logs: unknown argument '--all'"),
        (["/etc/shadow"], "logs: unknown argument '/etc/shadow'"),
    ],
)
def test_logs_bad_arguments(args: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_logs(args, limit=2000)
    assert str(e.value).startswith(message) and "usage: logs [-n N] [-f]" in str(e.value)


# --- status during an update, driving the progress API directly -----------------------------------


class FakeBootEnv:
    async def state(self) -> BootState:
        return BootState.from_env(ENV)


def make_device(tmp_path: Path) -> tuple[Device, list[str]]:
    config = Config(server=ServerConfig(lock_file=tmp_path / "update.lock", data_dir=tmp_path, run_dir=tmp_path))
    device = Device(config, bootenv=FakeBootEnv())  # type: ignore[arg-type]
    told: list[str] = []
    device.progress._notify = told.append  # what systemd would hear as STATUS=
    return device, told


async def test_status_fields_during_an_update(tmp_path: Path) -> None:
    device, told = make_device(tmp_path)
    assert (await status(device))["update"] is None
    device.progress.begin(UPLOADER, from_slot="a", from_version="1.0.0")
    device.progress.set(received=3_500_000)
    device.progress.set(percent=42)
    s = await status(device)
    u = s["update"]
    assert u["uploader"] == "root@10.0.0.9:40000" and u["key"] == "SHA256:abc" and u["transport"] == "ssh -s fwup"
    assert (u["stage"], u["received"], u["percent"]) == ("receiving", 3_500_000, 42)
    assert (u["from_slot"], u["from_version"], u["to_slot"], u["to_version"]) == ("a", "1.0.0", None, None)
    assert json.loads(json.dumps(s))["update"] == u  # the --json form carries the same fields
    text = render_status(s)
    assert "update:         receiving (ssh -s fwup from root@10.0.0.9:40000, 0 s)\n" in text, text
    assert "                1.0.0 (slot a) → ?; 3.5 MB received; fwup 42%\n" in text, text
    device.progress.set(stage="applied", to_slot="b", to_version="2.0.0", percent=100)
    text = render_status(await status(device))
    assert "update:         applied (" in text and "1.0.0 (slot a) → 2.0.0 (slot b); 3.5 MB received; fwup 100%" in text
    # systemd heard the stage and each tenth of fwup's progress, not every chunk
    assert told == [
        "update from root@10.0.0.9:40000: receiving",
        "update from root@10.0.0.9:40000: receiving, fwup 42%",
        "update from root@10.0.0.9:40000: applied",
    ]
    device.progress.end()
    device.progress.set(percent=1)  # a late event does not bring a finished update back
    assert (await status(device))["update"] is None


async def test_the_journal_supplies_the_pipeline_stages(tmp_path: Path) -> None:
    from sshfwup.update.journal import Journal

    device, _ = make_device(tmp_path)
    device.journal = Journal(tmp_path)
    device.journal.begin(uploader=str(UPLOADER), from_slot="a", from_version="1.0.0")
    device.progress.begin(UPLOADER, from_slot="a", from_version="1.0.0")
    assert device.update_progress().stage == "receiving"  # type: ignore[union-attr]
    time.sleep(0.01)
    device.journal.advance("applied", to_slot="b", to_version="2.0.0")
    device.journal.advance("swapping")
    now = device.update_progress()
    assert now is not None and (now.stage, now.to_slot, now.to_version) == ("swapping", "b", "2.0.0")


def test_unknown_progress_fields_are_a_bug(tmp_path: Path) -> None:
    device, _ = make_device(tmp_path)
    with pytest.raises(TypeError, match="unknown progress fields"):
        device.progress.set(bytes=1)


async def test_status_says_a_reboot_is_coming_and_which_server_answers(tmp_path: Path) -> None:
    device, _ = make_device(tmp_path)
    device.request_reboot("rebooting into 3.0.0 (slot b)")
    s = await status(device)
    assert s["rebooting"] == "rebooting into 3.0.0 (slot b)"
    assert s["server"]["instance"] == device.instance and len(device.instance) == 16
    assert "rebooting:      rebooting into 3.0.0 (slot b)\n" in render_status(s)
    assert Device(device.config, bootenv=FakeBootEnv()).instance != device.instance  # type: ignore[arg-type]


# --- end to end: a real update seen from another connection --------------------------------------


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return {"fwup": {"success_callback": "sshfwup.update.update:report_only"}}


async def test_status_during_a_real_update(sim: Sim, firmware) -> None:
    data = firmware("2.0.0").read_bytes()
    cut = len(data) // 2
    argv = ["ssh", *SSH_OPTIONS, "-i", str(sim.key.private), "-p", str(sim.port), "-s", f"root@{sim.host}", "fwup"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdin is not None
        proc.stdin.write(data[:cut])
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while True:
            s = sim.status()
            u = s["update"]
            if u and u["received"] == cut:
                break
            assert time.monotonic() < deadline, s
            await anyio.sleep(0.1)
        assert s["update_in_progress"] and u["stage"] == "receiving" and u["transport"] == "ssh -s fwup"
        assert u["uploader"].startswith("root@127.0.0.1:") and u["from_version"] == "1.0.0" and u["from_slot"] == "a"
        text = output(sim.ssh("status"))
        assert re.search(r"update: +receiving \(ssh -s fwup from root@127\.0\.0\.1:\d+, \d+ s\)\n", text), text
        proc.stdin.write(data[cut:])
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s = sim.status()
    assert s["update"] is None and not s["update_in_progress"]


async def test_logs_show_the_update_and_the_app(sim: Sim, firmware) -> None:
    assert sim.upload(firmware("2.0.0")).returncode == 0
    result = sim.ssh("logs", "-n", "2000")
    assert result.returncode == 0, output(result)
    text = result.stdout.decode()
    assert "sshfwup.update.report: fwup: Upgrading partition B" in text
    assert "sshfwup.update.report: sshfwup: firmware 2.0.0 installed in slot b" in text
    assert "app 1.0.0[" in text and "serving" in text  # the app's own output, with its version
    three = sim.ssh("logs", "-n", "3").stdout.decode().splitlines()
    # the newest three: this very connection being opened (it came after the first `logs`)
    assert len(three) == 3 and "sshfwup.ssh.server: connection from 127.0.0.1:" in three[0], three
    assert three[0] not in text
    bad = sim.ssh("logs", "--all")
    assert bad.returncode == 1 and "Error: logs: unknown argument '--all'" in output(bad)


async def test_logs_follow_shows_an_update_as_it_happens(sim: Sim, firmware) -> None:
    argv = ["ssh", *SSH_OPTIONS, "-i", str(sim.key.private), "-p", str(sim.port), f"root@{sim.host}", "logs", "-n", "0", "-f"]
    follower = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await anyio.sleep(1)  # it follows from now on, stdin closed (ssh -n) notwithstanding
        assert follower.poll() is None, follower.stderr.read()  # type: ignore[union-attr]
        assert (await anyio.to_thread.run_sync(lambda: sim.upload(firmware("2.0.0")))).returncode == 0
        await anyio.sleep(1)
    finally:
        follower.terminate()  # the client leaves (as Ctrl-C would)
        out, _ = follower.communicate(timeout=30)
    text = out.decode()
    assert "fwup: Upgrading partition B" in text and "fwup 100%" in text
    assert "sshfwup: firmware 2.0.0 installed in slot b" in text
    # the server noticed the follower leave and ended its session
    deadline = time.monotonic() + 10
    while "stopped following the log" not in (logs := sim.ssh("logs", "-n", "50").stdout.decode()):
        assert time.monotonic() < deadline, logs
        await anyio.sleep(0.2)


def test_status_says_when_the_last_update_installed_another_slot_than_the_running_one() -> None:
    """After a fallback or a blank boot env, "last update: ok" is about a slot the device no
    longer runs: status says so (and not while a reboot into it is pending)."""
    s: dict[str, Any] = {
        "running_root": "a", "active": None, "validated": None, "slots": {}, "pending_reboot": False,
        "boot_env_error": "no valid environment", "app": None, "last_update": {"ok": True, "verdict": "firmware 1.6.0 validated"},
        "journal": {"stage": "validated", "to_slot": "b", "to": "1.6.0"},
    }  # fmt: skip
    text = render_status(s)
    assert "last update:    ok: firmware 1.6.0 validated\n" in text, text
    assert "(that update installed slot b; the device runs slot a: it fell back, was reverted or lost its boot env" in text
    pending = {**s, "boot_env_error": None, "active": "b", "validated": False, "pending_reboot": True,
               "slots": {"a": {"version": "1.0.0"}, "b": {"version": "1.6.0"}}}  # fmt: skip
    assert "that update installed" not in render_status(pending)
    running = {**s, "running_root": "b"}
    assert "that update installed" not in render_status(running)
    failed = {**s, "last_update": {"ok": False, "verdict": "update failed: ..."}}
    assert "that update installed" not in render_status(failed)
