"""An upload that fwup refuses before it writes leaves the device exactly as it was (issue 28;
issue 23 item 4, "no mark without a write"): exit status 1, the boot env block byte for byte, the
other slot's bytes, ``revert`` to the whole firmware in the other slot still possible, and a
message that says nothing changed. A failure after fwup began writing keeps the slot marked
incomplete and says so. Real fwup, simulated device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Sim, env_block, other_slot_whole, output, slot_sha256, upload

from sshfwup.firmware.keys import load_private_key
from sshfwup.host.firmware_sign import sign_firmware


# case -> (what the device is told first, what fwup or sshfwup says)
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "wrong-platform": ({}, "Expecting platform=otherboard and architecture=x86_64"),
    # a task requirement no task meets: upgrade.a requires nerves_fw_active=b
    "no-task": ({"fwup": {"task": "upgrade.a"}}, "Couldn't find applicable task 'upgrade.a'"),
    "unvalidated": ({}, "is not validated yet"),
    "unsigned": ({"fwup": {"public_keys": ["ours"]}}, "Expecting signed firmware archive"),
    "other-key": ({"fwup": {"public_keys": ["ours"]}}, "fails digital signature verification"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_refused_upload_changes_nothing(sim: Sim, firmware, firmware_keys: dict[str, Path], tmp_path: Path,
                                                case: str) -> None:  # fmt: skip
    await other_slot_whole(sim, firmware)
    config, says = CASES[case]
    if config:
        fwup = dict(config["fwup"])
        if "public_keys" in fwup:
            fwup["public_keys"] = [str(firmware_keys["ours.pub"])]
        await sim.restart_server(fwup=fwup)
    if case == "unvalidated":
        sim.device.set_env(nerves_fw_validated="0")  # as after a first boot, before validation
    data = {
        "wrong-platform": lambda: firmware("3.0.0", platform="otherboard").read_bytes(),
        "other-key": lambda: sign_firmware(firmware("3.0.0"), tmp_path / "theirs.fw",
                                           load_private_key(firmware_keys["theirs"])).read_bytes(),  # fmt: skip
    }.get(case, lambda: firmware("3.0.0").read_bytes())()
    block, slot_b, slot_a = env_block(sim), slot_sha256(sim, "b"), slot_sha256(sim, "a")
    app = sim.status()["app"]

    result = await upload(sim, data)
    text = output(result)
    assert result.returncode == 1, text
    assert says in text, text
    # fwup's refusals end in sshfwup's verdict; sshfwup's own precheck refuses before anything ran
    assert "the device was not changed" in text if case != "unvalidated" else text.startswith("Error: "), text
    assert "partly written" not in text, text
    assert env_block(sim) == block, (sim.env(), text)  # every key, every mark: byte for byte
    assert slot_sha256(sim, "b") == slot_b and slot_sha256(sim, "a") == slot_a
    now = sim.status()
    assert now["app"]["pid"] == app["pid"] and now["app"]["version"] == app["version"]
    assert not now["update_in_progress"]

    # the whole firmware in slot b is still there to go back to
    result = sim.ssh("revert")
    assert result.returncode == 0 and "slot b (2.0.0) boots next" in output(result), output(result)
    env = sim.env()
    assert env["nerves_fw_active"] == "b" and "b.sshfwup_state" not in env, env


async def test_a_rolled_back_mark_survives_a_refusal(sim: Sim, firmware) -> None:
    """The mark goes back to what it was, not to unset: a rolled-back slot stays rolled back."""
    sim.device.set_env(**{"b.sshfwup_state": "rolled-back", "b.nerves_fw_version": "0.5.0"})
    block = env_block(sim)
    result = await upload(sim, firmware("3.0.0", platform="otherboard"))
    text = output(result)
    assert result.returncode == 1 and "the device was not changed" in text, text
    assert env_block(sim) == block, sim.env()


async def test_a_failure_after_fwup_wrote_keeps_the_mark_and_says_so(sim: Sim, firmware) -> None:
    await other_slot_whole(sim, firmware)
    data = bytearray(firmware("3.0.0").read_bytes())
    data[len(data) - 3000] ^= 0x10  # inside the root filesystem's data: fwup finds out while writing
    before = sim.env()
    result = await upload(sim, bytes(data))
    text = output(result)
    assert result.returncode == 1 and "ZIP bad CRC" in text, text
    assert "not changed" not in text, text
    assert ("slot b (2.0.0) was partly overwritten and is marked incomplete: nothing boots it, and revert is no "
            "longer possible until a new upload completes; slot a (1.0.0) still runs and boots next") in text, text
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["b.sshfwup_state"] == "incomplete", env
    # the mark is the only key that changed (fwup keeps its own env edits until on-finish)
    assert {k: v for k, v in env.items() if k != "b.sshfwup_state"} == before, (before, env)
    result = sim.ssh("revert")
    assert result.returncode == 1 and "slot b is incomplete" in output(result), output(result)


def test_the_signal_is_fwups_own_output() -> None:
    from sshfwup.update.fwup import FwupResult
    from sshfwup.update.update import refused_before_writing

    refused = FwupResult(exit_code=1, success=False, errors=("Expecting platform=x and architecture=y",))
    assert refused_before_writing(refused, went_on=False)
    assert not refused_before_writing(refused, went_on=True)  # progress past 0 came first
    wrote = FwupResult(exit_code=1, success=False, errors=("ZIP bad CRC",), messages=("Upgrading partition B",))
    assert not refused_before_writing(wrote, went_on=False)
    assert not refused_before_writing(FwupResult(exit_code=None, success=False), went_on=False)  # killed
    assert not refused_before_writing(FwupResult(exit_code=1, success=False), went_on=False)  # no error said
