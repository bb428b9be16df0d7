"""Start-up recovery (update/journal.plan_recovery, daemon._recover): after a firmware that never
validated, the bootloader boots the old one again, and sshfwup, which never ran on the new one,
must notice it and say so (found on the QEMU device: a firmware whose init fails fell back after
bootlimit tries, and `status` still said "last update: ok: ... rebooting into 1.3.0")."""

from __future__ import annotations

import sys

import pytest
from conftest import Sim, journal, output, upload

from sshfwup.sim.layout import BLOCK_SIZE
from sshfwup.update.journal import TRIAL_STAGES, Record, plan_recovery


def record(stage: str) -> Record:
    return Record(id="u1", stage=stage, from_slot="a", to_slot="b", from_version="1.0.0", to_version="3.0.0")  # type: ignore[arg-type]


@pytest.mark.parametrize("stage", TRIAL_STAGES)
def test_the_old_slot_running_and_named_after_a_trial_is_a_fallback(stage: str) -> None:
    plan = plan_recovery(record(stage), running_root="a", active="a")
    assert (plan.stage, plan.give_up, plan.app_slot, plan.revert_to, plan.reboot) == ("fell-back", "b", "a", None, False)
    assert "fell back to slot a (1.0.0)" in plan.message and "3.0.0 in slot b never validated" in plan.message


@pytest.mark.parametrize(
    ("stage", "running", "active", "expected"),
    [
        ("hot", "a", "b", None),  # hot-swapped, reboot pending: resume the new app, no fallback
        ("reboot", "a", "b", None),  # the reboot never happened: reboot now
        ("reboot", "b", "b", "booted"),  # the new firmware booted
        ("booted", "b", "b", None),  # still on trial in the new firmware
        ("validated", "a", "a", None),  # validated, then changed by hand: not sshfwup's fallback
        ("reverted", "a", "a", None),
    ],
)
def test_no_fallback_is_claimed_where_none_happened(stage: str, running: str, active: str, expected: str | None) -> None:
    plan = plan_recovery(record(stage), running_root=running, active=active)
    assert plan.give_up is None and plan.stage == expected, plan


def test_an_unknown_boot_env_claims_no_fallback() -> None:
    plan = plan_recovery(record("reboot"), running_root="a", active=None)
    assert plan.give_up is None and plan.stage is None


async def test_a_new_firmware_that_never_boots_falls_back_and_status_says_so(sim: Sim, firmware) -> None:
    """The reboot into 3.0.0 is held back (reboot_command true), slot b is made unbootable (its
    first MiB zeroed: the simulated boot cannot mount it, as a kernel that panics), then the
    device reboots: the bootloader tries b bootlimit times and boots a. sshfwup on a says it fell
    back, marks b rolled back, refuses a revert to it, and the next upload works."""
    await sim.restart_server(device={"reboot_command": ["true"]})
    result = await upload(sim, firmware("3.0.0", changes=("system-file",)))
    text = output(result)
    assert result.returncode == 0 and "rebooting into 3.0.0 (slot b)" in text, text
    assert sim.env()["nerves_fw_active"] == "b"
    offset, _ = sim.device.layout.slot_span("b")
    with open(sim.device.disk, "r+b") as f:
        f.seek(offset)
        f.write(bytes(256 * BLOCK_SIZE))
    before = sim.machine.state()
    assert before is not None
    sim.machine.reboot()
    state = await sim.machine.wait_boot(before.boot_count + 2, timeout=90)
    assert state.slot == "a" and "falling back to slot a" in (state.boot_reason or ""), state
    status = sim.status()
    last = status["last_update"]
    assert last["ok"] is False and journal(sim)["stage"] == "fell-back", status
    assert "fell back to slot a (1.0.0)" in last["verdict"] and "3.0.0 in slot b" in last["verdict"], last
    assert sim.env()["b.sshfwup_state"] == "rolled-back"
    text = output(sim.ssh("status"))
    assert "fell back to slot a" in text, text
    result = sim.ssh("revert")
    assert result.returncode != 0, output(result)
    await sim.restart_server(device={"reboot_command": [sys.executable, "-m", "sshfwup.sim", "reboot", str(sim.device.path)]})
    result = await upload(sim, firmware("2.0.0"))
    assert result.returncode == 0, output(result)
    assert sim.app()["version"] == "2.0.0"
