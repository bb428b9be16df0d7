"""The one door (sshfwup/update/door.py): while another change holds the device's update lock,
every command that changes the device's state and every upload transport is refused with a
message naming the holder, and changes nothing; every other command answers and changes nothing.
The commands come from the server's own registry (``commands.COMMANDS``): a command added there
is held to the same rule, and one that changes state without the door fails here."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import SSH_OPTIONS, Sim, assert_applied, output, wait_until

from sshfwup.ssh.commands import COMMANDS
from sshfwup.update.lock import DeviceLock

HOLDER = "a test that holds the update lock"
REPORT_ONLY = {"fwup": {"success_callback": "sshfwup.update.update:report_only"}}
# how each command is run here (a follow of the logs would never end)
INVOCATIONS = {"status": ["status"], "logs": ["logs", "-n", "5"], "reboot": ["reboot"], "revert": ["revert"],
               "validate": ["validate"]}  # fmt: skip


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return REPORT_ONLY


@contextmanager
def held(sim: Sim) -> Iterator[None]:
    """The device's update lock held by someone else (as another updater on the device would)."""
    lock = DeviceLock(sim.device.run_dir / "update.lock")
    lock.acquire(HOLDER)
    try:
        yield
    finally:
        lock.release()


def state_of(sim: Sim) -> tuple[Any, ...]:
    """What a change of state would change: the boot env, the boots, the app, the slot b bytes."""
    st = sim.machine.state()
    assert st is not None
    app = sim.status()["app"] or {}
    return sim.env(), st.boot_count, app.get("version"), app.get("pid"), sim.device.slot_bytes_sha256("b", 1 << 20)


def test_every_registered_command_has_an_invocation_here() -> None:
    assert set(INVOCATIONS) == set(COMMANDS), "a new command: add how it is run to INVOCATIONS"


@pytest.mark.parametrize("name", sorted(COMMANDS))
async def test_a_state_change_is_refused_naming_the_holder_and_nothing_else_changes(sim: Sim, name: str) -> None:
    command = COMMANDS[name]
    before = state_of(sim)
    with held(sim):
        result = await anyio.to_thread.run_sync(lambda: sim.ssh(*INVOCATIONS[name]))
        await anyio.sleep(1.0)  # a reboot, had it been asked for, would have begun
        text = output(result)
        if command.changes_state:
            assert result.returncode == 1, f"{name} ran past the update lock: {text}"
            assert f"busy: {HOLDER}" in text, text
        else:
            assert result.returncode == 0, text
        assert state_of(sim) == before, f"{name} changed the device while the update lock was held: {text}"
        assert sim.status()["rebooting"] is None


def _transports(sim: Sim, fw: Path) -> dict[str, list[str]]:
    opts = [*SSH_OPTIONS, "-i", str(sim.key.private)]
    target = f"root@{sim.host}"
    return {
        "ssh -s fwup": ["ssh", *opts, "-p", str(sim.port), "-s", target, "fwup"],
        "scp": ["scp", *opts, "-P", str(sim.port), str(fw), f"{target}:/fwup"],
        "scp -O": ["scp", "-O", *opts, "-P", str(sim.port), str(fw), f"{target}:/fwup"],
        "sftp": ["sftp", *opts, "-P", str(sim.port), "-b", "-", target],
        "sshfwup upload": [sys.executable, "-m", "sshfwup", "upload", target, str(fw), "-p", str(sim.port), "-i",
                           str(sim.key.private), "--insecure-accept-host-key"],  # fmt: skip
    }


async def test_every_upload_transport_is_refused_naming_the_holder(sim: Sim, firmware) -> None:
    fw = firmware("2.0.0")
    before = state_of(sim)
    with held(sim):
        for transport, argv in _transports(sim, fw).items():
            stdin = fw.read_bytes() if transport == "ssh -s fwup" else f"put {fw} /fwup\n".encode()
            result = await anyio.to_thread.run_sync(lambda: sim.run(argv, input=stdin))
            assert result.returncode != 0, f"{transport}: uploaded past the update lock: {output(result)}"
            if transport in ("ssh -s fwup", "sshfwup upload", "scp", "scp -O"):
                assert f"busy: {HOLDER}" in output(result), f"{transport}: {output(result)}"
            assert state_of(sim) == before, transport
    assert_applied(sim, sim.upload(fw))  # the lock released: the same upload goes through


async def test_reboot_during_an_upload_is_refused_then_forced(sim: Sim, firmware) -> None:
    data = firmware("2.0.0").read_bytes()
    argv = ["ssh", *SSH_OPTIONS, "-i", str(sim.key.private), "-p", str(sim.port), "-s", f"root@{sim.host}", "fwup"]
    upload = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert upload.stdin is not None
    try:
        upload.stdin.write(data[: len(data) // 2])
        upload.stdin.flush()
        await wait_until(lambda: sim.status()["update_in_progress"], what="the upload holding the lock")
        boots = sim.machine.state().boot_count
        refused = await anyio.to_thread.run_sync(lambda: sim.ssh("reboot"))
        text = output(refused)
        assert refused.returncode == 1 and "not rebooting: the device is busy: an upload from " in text, text
        assert "reboot --force" in text, text  # says what an operator who means it can do
        done = await anyio.to_thread.run_sync(lambda: upload.communicate(data[len(data) // 2 :], timeout=120)[0])
        assert upload.returncode == 0, done.decode()
        assert sim.machine.state().boot_count == boots  # the refused reboot never came
        # a forced reboot goes past a holder, and says so
        with held(sim):
            forced = await anyio.to_thread.run_sync(lambda: sim.ssh("reboot", "--force"))
            assert forced.returncode == 0 and f"forced past {HOLDER}" in output(forced), output(forced)
            deadline = time.monotonic() + 60
            while sim.machine.state().boot_count == boots:
                assert time.monotonic() < deadline, "reboot --force did not reboot"
                await anyio.sleep(0.2)
    finally:
        if upload.poll() is None:
            upload.kill()
            upload.wait()
