"""Each boot contract end to end on the simulated device with the real fwup and server: hot
update, reboot update, validate, revert (proven and unproven), a trial boot that never validates,
and the loud warning when a Nerves U-Boot validates on its own."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Sim, output, upload, wait_until

FAST = {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}
CONTRACTS = ["uboot-bootcount", "uboot-nerves"]


def config(contract: str, **app: Any) -> dict[str, Any]:
    return {"app": {**FAST, **app}, "boot": {"contract": contract}}


def by_contract(**app: Any) -> Any:
    return pytest.mark.parametrize(
        "sim_config", [config(c, **app) for c in CONTRACTS], ids=CONTRACTS
    )


def contract_of(sim: Sim) -> str:
    return sim.device.contract


@by_contract()
async def test_hot_update_reboot_and_validation(sim: Sim, firmware) -> None:
    s = sim.status()
    assert s["boot_contract"] == contract_of(sim) and s["boot_warnings"] == [] and s["trial_boot"] is False
    if contract_of(sim) == "uboot-nerves":
        assert sim.env()["nerves_fw_autovalidate"] == "0"  # the factory env sshfwup needs
    assert (await upload(sim, firmware("2.0.0"))).returncode == 0  # hot: the app swapped, reboot pending
    assert sim.app()["version"] == "2.0.0"
    s = sim.status()
    assert s["pending_reboot"] and s["active"] == "b" and s["trial_boot"] is True
    assert "next boot:      slot b (not validated; on trial: the bootloader falls back" in output(sim.ssh("status"))
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "b"
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="validation after a healthy boot")
    env = sim.env()
    if contract_of(sim) == "uboot-nerves":
        assert env["nerves_fw_booted"] == "1"
    else:
        assert env["upgrade_available"] == "0" and env["bootcount"] == "0"
    assert sim.status()["trial_boot"] is False
    assert sim.ssh("reboot").returncode == 0  # validated: it keeps booting
    assert (await sim.machine.wait_boot(3, timeout=30)).slot == "b"


@by_contract(observe=60)
async def test_reboot_update_then_the_validate_command(sim: Sim, firmware) -> None:
    result = await upload(sim, firmware("3.0.0", changes=("kernel",)))
    assert result.returncode == 0 and "reboot required" in output(result), output(result)
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "b"
    assert sim.env()["nerves_fw_validated"] == "0" and sim.status()["trial_boot"] is True  # observing
    result = sim.ssh("validate")
    assert result.returncode == 0 and "validated firmware 3.0.0 in slot b" in output(result), output(result)
    assert sim.env()["nerves_fw_validated"] == "1" and sim.status()["trial_boot"] is False


@by_contract()
async def test_proven_revert_after_a_hot_swap(sim: Sim, firmware) -> None:
    await upload(sim, firmware("2.0.0"))
    result = sim.ssh("revert")
    assert result.returncode == 0 and "no reboot needed" in output(result), output(result)
    assert sim.app()["version"] == "1.0.0"
    s = sim.status()
    assert not s["pending_reboot"] and s["active"] == "a" and s["validated"] and not s["trial_boot"]
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "a"


@by_contract()
async def test_unproven_revert_boots_the_other_slot_on_trial(sim: Sim, firmware) -> None:
    assert (await upload(sim, firmware("2.0.0"))).returncode == 0
    assert sim.ssh("reboot").returncode == 0
    await sim.machine.wait_boot(2, timeout=30)
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="2.0.0 validated")
    result = sim.ssh("revert")
    assert result.returncode == 0 and "unvalidated until it proves healthy" in output(result), output(result)
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "0"
    if contract_of(sim) == "uboot-nerves":
        assert env["nerves_fw_booted"] == "0"  # a first boot again, or the script would undo the revert
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(3, timeout=30)).slot == "a"  # the bootloader kept the choice
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="1.0.0 validated after a healthy boot")
    assert sim.app()["version"] == "1.0.0"


@by_contract(observe=60)
async def test_a_trial_boot_that_never_validates_falls_back(sim: Sim, firmware) -> None:
    if contract_of(sim) == "uboot-bootcount":
        sim.device.set_env(bootlimit="1")  # one attempt, like the Nerves script
    assert (await upload(sim, firmware("3.0.0", changes=("kernel",)))).returncode == 0
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "b"
    assert sim.env()["nerves_fw_validated"] == "0"  # still observing: not validated
    assert sim.ssh("reboot").returncode == 0  # the trial ends unvalidated
    state = await sim.machine.wait_boot(3, timeout=30)
    assert state.slot == "a"  # the bootloader fell back on its own
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1"
    await wait_until(lambda: sim.app()["version"] == "1.0.0", what="1.0.0 serving again")


@pytest.mark.parametrize("sim_config", [config("uboot-nerves")])
async def test_autovalidate_is_reported_loudly(sim: Sim, firmware) -> None:
    sim.device.set_env(nerves_fw_autovalidate="1")
    await sim.restart_server()
    s = sim.status()
    assert len(s["boot_warnings"]) == 1 and "nerves_fw_autovalidate=1" in s["boot_warnings"][0]
    text = output(sim.ssh("status"))
    assert "WARNING:" in text and "health-gated validation protects nothing" in text, text
    assert "BOOT CONTRACT WARNING: nerves_fw_autovalidate=1" in sim.machine.log_path.read_text(errors="replace")
    # and it is true: U-Boot validates the new firmware at its first boot, before any health check
    await upload(sim, firmware("3.0.0", changes=("kernel",)))
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "b"
    assert sim.env()["nerves_fw_validated"] == "1"
