"""Each boot contract against its simulated U-Boot script, on a real env block (fw_setenv):
validate, revert proven and unproven, a trial boot that never validates, and what state says."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from sshfwup.boot.backends import make_contract
from sshfwup.boot.bootenv import ROLLED_BACK, BootEnv, slot_state_var
from sshfwup.boot.contract import BootContract
from sshfwup.boot.uboot_nerves import AUTOVALIDATE_WARNING
from sshfwup.sim.bootloader import boot
from sshfwup.sim.layout import DEFAULT_LAYOUT

SLOTS = {"a.nerves_fw_version": "1.0.0", "b.nerves_fw_version": "2.0.0"}
# What fwup's complete task (deploy/fwup.conf) leaves, plus each system's factory env.
FACTORY = {
    "uboot-bootcount": {
        "nerves_fw_active": "a", "nerves_fw_validated": "1", "nerves_fw_booted": "0",
        "upgrade_available": "0", "bootcount": "0", "bootlimit": "3", **SLOTS,
    },
    "uboot-nerves": {
        "nerves_fw_active": "a", "nerves_fw_validated": "1", "nerves_fw_booted": "0",
        "nerves_fw_autovalidate": "0", **SLOTS,
    },
}  # fmt: skip
# What each system's fwup upgrade on-finish writes when it switches to slot b.
UPGRADE_TO_B = {
    "uboot-bootcount": {"nerves_fw_active": "b", "nerves_fw_validated": "0", "nerves_fw_booted": "0",
                        "upgrade_available": "1", "bootcount": "0"},
    "uboot-nerves": {"nerves_fw_active": "b", "nerves_fw_validated": "0", "nerves_fw_booted": "0"},
}  # fmt: skip


def make_env(tmp_path: Path, values: Mapping[str, str]) -> BootEnv:
    image = tmp_path / "disk.img"
    offset, size = DEFAULT_LAYOUT.uboot_env_span
    with open(image, "wb") as f:
        f.truncate(offset + size)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{image} 0x{offset:x} 0x{size:x}\n")
    defaults = tmp_path / "defaults.env"
    defaults.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    subprocess.run(["fw_setenv", "-c", str(config), "-f", str(defaults)], check=True, capture_output=True)
    return BootEnv(config)


@pytest.fixture(params=["uboot-bootcount", "uboot-nerves"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, BootEnv, BootContract]:
    name = request.param
    env = make_env(tmp_path, FACTORY[name])
    return name, env, make_contract(name, env, health_gated=True)


def boots(env: BootEnv, contract: str, times: int) -> list[str]:
    return [boot(env, contract).slot for _ in range(times)]


async def test_a_validated_upgrade_keeps_booting(device: tuple[str, BootEnv, BootContract]) -> None:
    name, env, contract = device
    assert boots(env, name, 1) == ["a"]
    env.write_sync(UPGRADE_TO_B[name])
    assert (await contract.state()).trial
    assert boots(env, name, 1) == ["b"]
    state = await contract.state()
    assert (state.active, state.validated, state.trial, state.contract) == ("b", False, True, name)
    await contract.validate()
    state = await contract.state()
    assert (state.validated, state.trial) == (True, False)
    assert boots(env, name, 5) == ["b"] * 5


async def test_a_trial_that_never_validates_falls_back(device: tuple[str, BootEnv, BootContract]) -> None:
    name, env, contract = device
    boots(env, name, 1)
    env.write_sync(UPGRADE_TO_B[name])
    # bootcount: bootlimit (3) attempts, then the other slot; Nerves' script: one trial boot.
    expected = ["b", "b", "b", "a", "a"] if name == "uboot-bootcount" else ["b", "a", "a", "a", "a"]
    assert boots(env, name, 5) == expected
    state = await contract.state()
    assert (state.active, state.validated, state.trial) == ("a", True, False)


async def test_unproven_revert_boots_the_slot_on_trial_then_falls_back(device: tuple[str, BootEnv, BootContract]) -> None:
    name, env, contract = device
    boots(env, name, 1)  # slot a runs, validated, booted once
    await contract.revert_to("b", proven=False)
    state = await contract.state()
    assert (state.active, state.validated, state.trial) == ("b", False, True)
    first = boots(env, name, 1)
    assert first == ["b"], "the script must boot the reverted slot (on trial), not undo the revert"
    assert (await contract.state()).trial
    rest = boots(env, name, 4)
    assert rest[-1] == "a" and (await contract.state()).validated  # never validated: fallback


async def test_unproven_revert_that_validates_stays(device: tuple[str, BootEnv, BootContract]) -> None:
    name, env, contract = device
    boots(env, name, 1)
    await contract.revert_to("b", proven=False)
    assert boots(env, name, 1) == ["b"]
    await contract.validate()
    assert boots(env, name, 4) == ["b"] * 4


async def test_proven_revert_with_a_mark_in_one_write(device: tuple[str, BootEnv, BootContract]) -> None:
    name, env, contract = device
    boots(env, name, 1)
    env.write_sync(UPGRADE_TO_B[name])  # pending: b boots next, unvalidated
    await contract.revert_to("a", also={slot_state_var("b"): ROLLED_BACK})
    state = await contract.state()
    assert (state.active, state.validated, state.trial) == ("a", True, False)
    assert state.slots["b"].state == ROLLED_BACK and not state.slots["b"].usable
    assert boots(env, name, 4) == ["a"] * 4


async def test_marks_are_sshfwups_own(device: tuple[str, BootEnv, BootContract]) -> None:
    name, env, contract = device
    await contract.mark_slot("b", "incomplete")
    assert env.read_sync()["b.sshfwup_state"] == "incomplete"
    await contract.prevent("b", ROLLED_BACK)
    assert (await contract.state()).slots["b"].state == ROLLED_BACK
    await contract.mark_slot("b", None)
    assert "b.sshfwup_state" not in env.read_sync()


# --- what only the Nerves contract has ---------------------------------------------------------


async def test_validated_0_alone_is_undone_by_the_nerves_script(tmp_path: Path) -> None:
    """Why the Nerves backend writes nerves_fw_booted=0: the bootcount contract's unproven revert
    leaves nerves_fw_booted=1, and the Nerves script reverts the revert at the next boot."""
    env = make_env(tmp_path, FACTORY["uboot-nerves"])
    boots(env, "uboot-nerves", 1)
    await make_contract("uboot-bootcount", env).revert_to("b", proven=False)
    assert boots(env, "uboot-nerves", 1) == ["a"]  # the revert never ran
    await make_contract("uboot-nerves", env).revert_to("b", proven=False)
    assert env.read_sync()["nerves_fw_booted"] == "0"
    assert boots(env, "uboot-nerves", 1) == ["b"]


async def test_autovalidate_is_reported_when_validation_is_health_gated(tmp_path: Path) -> None:
    env = make_env(tmp_path, {**FACTORY["uboot-nerves"], "nerves_fw_autovalidate": "1"})
    gated, ungated = make_contract("uboot-nerves", env, health_gated=True), make_contract("uboot-nerves", env)
    assert (await gated.state()).warnings == (AUTOVALIDATE_WARNING,)
    assert (await ungated.state()).warnings == ()
    assert "health-gated validation protects nothing" in AUTOVALIDATE_WARNING
    env.write_sync(UPGRADE_TO_B["uboot-nerves"])
    assert not (await gated.state()).trial  # U-Boot will validate it before any app runs
    assert boots(env, "uboot-nerves", 1) == ["b"]
    assert (await gated.state()).validated  # ... and did


async def test_bootcount_contract_state_matches_todays_reading(tmp_path: Path) -> None:
    env = make_env(tmp_path, {**FACTORY["uboot-bootcount"], **UPGRADE_TO_B["uboot-bootcount"]})
    state = await make_contract("uboot-bootcount", env).state()
    assert (state.active, state.validated, state.trial, state.warnings) == ("b", False, True, ())
    assert env.read_sync()["upgrade_available"] == "1"
