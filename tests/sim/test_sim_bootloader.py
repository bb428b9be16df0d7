"""The simulated U-Boot: the pure boot decision, and the env adapter on a real env block."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sshfwup.boot.bootenv import BootEnv, BootEnvError
from sshfwup.sim.bootloader import BootChoice, boot, choose_boot
from sshfwup.sim.layout import DEFAULT_LAYOUT

VALIDATED_A = {
    "nerves_fw_active": "a",
    "nerves_fw_validated": "1",
    "upgrade_available": "0",
    "bootcount": "0",
    "bootlimit": "3",
    "nerves_fw_booted": "0",
}
UPGRADED_TO_B = {**VALIDATED_A, "nerves_fw_active": "b", "nerves_fw_validated": "0", "upgrade_available": "1"}


# --- choose_boot: every branch ----------------------------------------------------------------


def test_validated_firmware_boots_active_slot_and_only_marks_booted() -> None:
    choice = choose_boot(VALIDATED_A)
    assert choice == BootChoice("a", {"nerves_fw_booted": "1"}, "booting slot a")


@pytest.mark.parametrize("slot", ["a", "b"])
def test_active_slot_is_followed(slot: str) -> None:
    assert choose_boot({**VALIDATED_A, "nerves_fw_active": slot}).slot == slot


def test_unvalidated_firmware_counts_boot_attempts() -> None:
    choice = choose_boot(UPGRADED_TO_B)
    assert choice.slot == "b"
    assert choice.updates == {"bootcount": "1", "nerves_fw_booted": "1"}
    assert "attempt 1 of 3" in choice.reason


def test_last_allowed_attempt_still_boots_the_new_slot() -> None:
    choice = choose_boot({**UPGRADED_TO_B, "bootcount": "2"})
    assert choice.slot == "b"
    assert choice.updates["bootcount"] == "3"
    assert "nerves_fw_active" not in choice.updates


def test_bootcount_over_limit_falls_back_to_the_other_slot() -> None:
    choice = choose_boot({**UPGRADED_TO_B, "bootcount": "3"})
    assert choice.slot == "a"
    assert choice.updates == {
        "nerves_fw_active": "a",
        "nerves_fw_validated": "1",
        "upgrade_available": "0",
        "bootcount": "0",
        "nerves_fw_booted": "1",
    }
    assert "falling back to slot a" in choice.reason


def test_fallback_from_a_goes_to_b() -> None:
    env = {**UPGRADED_TO_B, "nerves_fw_active": "a", "bootcount": "5", "bootlimit": "1"}
    choice = choose_boot(env)
    assert choice.slot == "b"
    assert choice.updates["nerves_fw_active"] == "b"


def test_empty_env_boots_a_with_defaults_and_says_so() -> None:
    choice = choose_boot({})
    assert choice.slot == "a"
    assert choice.updates == {"nerves_fw_active": "a", "nerves_fw_booted": "1"}
    assert "nerves_fw_active not set" in choice.reason
    assert "upgrade_available not set" in choice.reason


def test_invalid_active_slot_falls_back_to_a() -> None:
    choice = choose_boot({**VALIDATED_A, "nerves_fw_active": "c"})
    assert choice.slot == "a"
    assert choice.updates["nerves_fw_active"] == "a"
    assert "'c' is not a slot" in choice.reason


def test_missing_upgrade_available_uses_nerves_fw_validated() -> None:
    env = {k: v for k, v in UPGRADED_TO_B.items() if k != "upgrade_available"}
    choice = choose_boot(env)
    assert choice.slot == "b"
    assert choice.updates["bootcount"] == "1"
    assert "treating the firmware as unvalidated" in choice.reason


@pytest.mark.parametrize(
    ("bootcount", "bootlimit", "expected_slot", "note"),
    [
        (None, "3", "b", "bootcount not set"),
        ("x", "3", "b", "bootcount='x' is not a number"),
        ("3", None, "a", "bootlimit not set"),  # default limit 3: attempt 4 falls back
        ("0", "-1", "b", "bootlimit='-1' is negative"),
    ],
)
def test_bad_counters_use_defaults(bootcount: str | None, bootlimit: str | None, expected_slot: str, note: str) -> None:
    env = dict(UPGRADED_TO_B)
    for name, value in (("bootcount", bootcount), ("bootlimit", bootlimit)):
        if value is None:
            del env[name]
        else:
            env[name] = value
    choice = choose_boot(env)
    assert choice.slot == expected_slot
    assert note in choice.reason


def test_choose_boot_does_not_modify_its_input() -> None:
    env = dict(UPGRADED_TO_B)
    choose_boot(env)
    assert env == UPGRADED_TO_B


# --- the env adapter and boot(), with the real fw_printenv / fw_setenv ---------------------------


@pytest.fixture
def env_block(tmp_path: Path) -> BootEnv:
    """An image with a valid env block at the simulated layout's offset, holding VALIDATED_A."""
    image = tmp_path / "disk.img"
    offset, size = DEFAULT_LAYOUT.uboot_env_span
    with open(image, "wb") as f:
        f.truncate(offset + size)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{image} 0x{offset:x} 0x{size:x}\n")
    defaults = tmp_path / "defaults.env"
    defaults.write_text("".join(f"{k}={v}\n" for k, v in VALIDATED_A.items()))
    # With no valid block on the image, fw_setenv stores the default environment.
    subprocess.run(["fw_setenv", "-c", str(config), "-f", str(defaults)], check=True, capture_output=True)
    return BootEnv(config)


def test_read_returns_every_variable(env_block: BootEnv) -> None:
    assert env_block.read_sync() == VALIDATED_A


def test_write_sets_and_deletes_in_one_call(env_block: BootEnv) -> None:
    env_block.write_sync({"nerves_fw_active": "b", "greeting": "hello world", "bootlimit": None})
    env = env_block.read_sync()
    assert env["nerves_fw_active"] == "b"
    assert env["greeting"] == "hello world"
    assert "bootlimit" not in env


@pytest.mark.parametrize("name", ["", "a=b", "with space"])
def test_write_rejects_bad_names(env_block: BootEnv, name: str) -> None:
    with pytest.raises(BootEnvError, match="invalid U-Boot variable name"):
        env_block.write_sync({name: "1"})


def test_write_rejects_multiline_values(env_block: BootEnv) -> None:
    with pytest.raises(BootEnvError, match="single line"):
        env_block.write_sync({"x": "1\ny=2"})


def test_read_of_blank_image_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "blank.img"
    image.write_bytes(b"\0" * (2 * 1024 * 1024))
    config = tmp_path / "fw_env.config"
    config.write_text(f"{image} 0x100000 0x20000\n")
    with pytest.raises(BootEnvError, match="fw_printenv"):
        BootEnv(config).read_sync()


def test_missing_tool_is_named(env_block: BootEnv) -> None:
    env = BootEnv(env_block.config, printenv="/nonexistent/fw_printenv")
    with pytest.raises(BootEnvError, match="libubootenv"):
        env.read_sync()


def test_boot_cycle_on_real_env_falls_back_after_bootlimit(env_block: BootEnv) -> None:
    first = boot(env_block)
    assert first.slot == "a"
    assert env_block.read_sync()["nerves_fw_booted"] == "1"

    env_block.write_sync({"nerves_fw_active": "b", "nerves_fw_validated": "0", "upgrade_available": "1"})
    slots = [boot(env_block).slot for _ in range(4)]
    assert slots == ["b", "b", "b", "a"]
    env = env_block.read_sync()
    assert env["nerves_fw_active"] == "a"
    assert env["nerves_fw_validated"] == "1"
    assert env["upgrade_available"] == "0"
    assert env["bootcount"] == "0"


def test_boot_of_validated_firmware_leaves_env_unchanged_after_first_boot(env_block: BootEnv) -> None:
    boot(env_block)
    image = Path(env_block.config.read_text().split()[0])
    before = image.read_bytes()
    boot(env_block)
    assert image.read_bytes() == before  # nothing changed, so nothing was written
