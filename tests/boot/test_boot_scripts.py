"""deploy/uboot/*/boot.cmd, run by a minimal U-Boot shell (tests/boot/uboot_shell.py) against a
real environment block, decide and write exactly what the simulator's bootloader does — so the
simulator's contract is the scripts' and the QEMU device's. No setexpr anywhere."""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from uboot_shell import UBoot

from sshfwup.boot.bootenv import BootEnv
from sshfwup.sim.bootloader import boot
from sshfwup.sim.layout import DEFAULT_LAYOUT

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "uboot"
SCRIPTS = {"uboot-bootcount": DEPLOY / "bootcount" / "boot.cmd", "uboot-nerves": DEPLOY / "nerves" / "boot.cmd"}
BOARD = {"bootdelay": "2", "sshfwup_boot_a": "echo a", "sshfwup_boot_b": "echo b", "kernel_addr_r": "0x1000000"}
SLOTS = {"a.nerves_fw_version": "1.0.0", "b.nerves_fw_version": "2.0.0", "b.sshfwup_state": "rolled-back"}


def env_image(tmp_path: Path, values: Mapping[str, str]) -> tuple[Path, BootEnv]:
    image = tmp_path / "disk.img"
    offset, size = DEFAULT_LAYOUT.uboot_env_span
    assert (offset, size) == (0x800 * 512, 0x100 * 512)  # what the scripts' board section says
    with open(image, "wb") as f:
        f.truncate(offset + size)
    config = tmp_path / "fw_env.config"
    config.write_text(f"{image} 0x{offset:x} 0x{size:x}\n")
    defaults = tmp_path / "defaults.env"
    defaults.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    subprocess.run(["fw_setenv", "-c", str(config), "-f", str(defaults)], check=True, capture_output=True)
    return image, BootEnv(config)


def script_and_sim(tmp_path: Path, contract: str, values: Mapping[str, str]) -> tuple[tuple[str, dict], tuple[str, dict]]:
    """(slot, env after) by the script, and by the simulator, from the same environment."""
    (tmp_path / "script").mkdir(parents=True)
    image, env = env_image(tmp_path / "script", values)
    uboot = UBoot(image, env=dict(BOARD))
    uboot.source(SCRIPTS[contract].read_text())
    assert uboot.booted is not None, uboot.output
    by_script = (uboot.booted.removeprefix("sshfwup_boot_"), env.read_sync())
    assert all(uboot.env.get(k) == v for k, v in BOARD.items())  # the board's environment came back
    (tmp_path / "sim").mkdir(parents=True)
    _, sim_env = env_image(tmp_path / "sim", values)
    choice = boot(sim_env, contract)
    return by_script, (choice.slot, sim_env.read_sync())


BOOTCOUNT_BASE = {"nerves_fw_active": "a", "nerves_fw_validated": "1", "nerves_fw_booted": "0",
                  "upgrade_available": "0", "bootcount": "0", "bootlimit": "3", **SLOTS}  # fmt: skip
BOOTCOUNT_CASES = [
    {},
    {"nerves_fw_booted": "1"},
    *({"nerves_fw_active": "b", "nerves_fw_validated": "0", "upgrade_available": "1", "bootcount": str(n)} for n in range(5)),
    {"nerves_fw_active": "b", "nerves_fw_validated": "0", "upgrade_available": "1", "bootlimit": "1"},
    {"nerves_fw_active": "b", "nerves_fw_validated": "0", "upgrade_available": "1", "bootcount": "1", "bootlimit": "1"},
    {"nerves_fw_active": "a", "upgrade_available": "1", "bootcount": "9", "bootlimit": "9"},
    {"nerves_fw_active": "b", "upgrade_available": "1", "bootcount": "x", "bootlimit": "y"},
    {"nerves_fw_active": "b", "upgrade_available": "1", "bootcount": "-1"},
    {"nerves_fw_active": "b", "upgrade_available": "1", "bootlimit": "0"},
    {"nerves_fw_active": "b", "nerves_fw_validated": "0", "upgrade_available": None, "bootcount": None},
    {"nerves_fw_active": "b", "nerves_fw_validated": "1", "upgrade_available": None},
    {"nerves_fw_active": "c"},
    {"nerves_fw_active": None, "upgrade_available": "1", "bootcount": "3"},
]
NERVES_CASES = [
    {"nerves_fw_active": active, "nerves_fw_booted": booted, "nerves_fw_validated": validated, "nerves_fw_autovalidate": auto}
    for active, booted, validated, auto in itertools.product(("a", "b", "x"), ("0", "1", None), ("0", "1"), ("0", "1", None))
]


def _env(base: Mapping[str, str], case: Mapping[str, str | None]) -> dict[str, str]:
    merged = {**base, **case}
    return {k: v for k, v in merged.items() if v is not None}


@pytest.mark.parametrize("case", BOOTCOUNT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "validated")
def test_bootcount_script_is_the_simulators_decision(tmp_path: Path, case: dict) -> None:
    by_script, by_sim = script_and_sim(tmp_path, "uboot-bootcount", _env(BOOTCOUNT_BASE, case))
    assert by_script == by_sim


def test_nerves_script_is_the_simulators_decision(tmp_path: Path) -> None:
    for n, case in enumerate(NERVES_CASES):
        by_script, by_sim = script_and_sim(tmp_path / str(n), "uboot-nerves", _env(SLOTS, case))
        assert by_script == by_sim, case


def test_a_trial_runs_out_by_script_alone(tmp_path: Path) -> None:
    """Boot after boot on one disk: bootlimit 3 trial boots of b, then a, as proven."""
    image, env = env_image(tmp_path, {**BOOTCOUNT_BASE, "nerves_fw_active": "b", "nerves_fw_validated": "0",
                                      "upgrade_available": "1"})  # fmt: skip
    slots = []
    for _ in range(5):
        uboot = UBoot(image, env=dict(BOARD))
        uboot.source(SCRIPTS["uboot-bootcount"].read_text())
        slots.append(uboot.booted)
    assert slots == ["sshfwup_boot_b"] * 3 + ["sshfwup_boot_a"] * 2
    after = env.read_sync()
    assert (after["nerves_fw_active"], after["nerves_fw_validated"], after["bootcount"]) == ("a", "1", "0")
    assert "bootdelay" not in after  # the board's own environment never reaches the disk's


@pytest.mark.parametrize("contract", sorted(SCRIPTS))
def test_scripts_use_no_setexpr_and_compile(contract: str, tmp_path: Path) -> None:
    text = SCRIPTS[contract].read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "setexpr" not in code and "saveenv" not in code
    if shutil.which("mkimage") is None:
        pytest.skip("mkimage (u-boot-tools) is not installed")
    out = tmp_path / "boot.scr"
    subprocess.run(["mkimage", "-A", "arm", "-O", "linux", "-T", "script", "-C", "none", "-d", str(SCRIPTS[contract]), str(out)],
                   check=True, capture_output=True)  # fmt: skip
    assert out.stat().st_size > len(text)


def test_the_qemu_device_runs_the_shipped_script_after_its_board_part(tmp_path: Path) -> None:
    """`sshfwup vm build`'s boot script: deploy/vm/board.cmd, then deploy/uboot/bootcount/boot.cmd
    unchanged. The board part's commands (in U-Boot's own environment) survive the script's swap to
    the disk's environment and back, with ${filesize} kept for the run (single quotes)."""
    from sshfwup.vm.contracts import vm_contract
    from sshfwup.vm.image import boot_script_source

    source = boot_script_source(vm_contract("uboot-bootcount"))
    assert source.endswith(SCRIPTS["uboot-bootcount"].read_text())
    image, env = env_image(tmp_path, {**BOOTCOUNT_BASE, "nerves_fw_active": "b", "nerves_fw_validated": "0",
                                      "upgrade_available": "1"})  # fmt: skip
    uboot = UBoot(image, env={"bootdelay": "2", "scriptaddr": "0x7000000"})
    uboot.source(source)
    assert uboot.booted == "sshfwup_boot_b", uboot.output
    after = env.read_sync()
    assert (after["nerves_fw_active"], after["bootcount"]) == ("b", "1")
    assert not any(k.startswith("sshfwup_boot_") for k in after)  # the board's commands stay U-Boot's
    command = uboot.env["sshfwup_boot_b"]
    assert "root=/dev/vda3 " in command and "load virtio 0:1 0x10000000 initrd.b;" in command
    assert command.endswith("zboot 0x3000000 0 0x10000000 ${filesize}")
    assert "root=/dev/vda2 " in uboot.env["sshfwup_boot_a"] and "vmlinuz.a;" in uboot.env["sshfwup_boot_a"]


class RecordingUBoot(UBoot):
    """The emulator, keeping every disk command as run (variables expanded)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.disk_commands: list[str] = []

    def _command(self, text: str) -> bool:
        words = self._words(text)
        if len(words) >= 2 and words[1] in ("dev", "read", "write"):
            self.disk_commands.append(" ".join(words))
        return super()._command(text)


@pytest.mark.parametrize("contract", ["uboot-nerves", "fwup-ops"])
def test_the_qemu_device_runs_the_shipped_nerves_script_with_its_own_board_values(tmp_path: Path, contract: str) -> None:
    """`sshfwup vm build --contract uboot-nerves|fwup-ops`: deploy/vm/board.cmd, board-nerves.cmd,
    then deploy/uboot/nerves/boot.cmd unchanged, whose own board section is a BeagleBone's (mmc,
    0x82000000). With the VM's factory env the script reads and writes the env on virtio at block
    0x800 through buffers in the VM's RAM, gives a new firmware its one trial boot and falls back."""
    from sshfwup.vm.contracts import vm_contract
    from sshfwup.vm.image import boot_script_source

    source = boot_script_source(vm_contract(contract))
    assert source.endswith(SCRIPTS["uboot-nerves"].read_text())
    board_values = {"disk_if": "virtio", "disk_dev": "0", "env_addr": "0x4000000", "env_blk": "0x800", "env_cnt": "0x100",
                    "env_size": "0x20000", "board_addr": "0x4100000"}  # fmt: skip (factory-env-nerves.conf)
    image, env = env_image(tmp_path, {**board_values, "nerves_fw_active": "b", "nerves_fw_validated": "0",
                                      "nerves_fw_booted": "0", "nerves_fw_autovalidate": "0", **SLOTS})  # fmt: skip
    slots = []
    for _ in range(2):  # the trial boot, then the boot after it (never validated)
        uboot = RecordingUBoot(image, env={"bootdelay": "2", "scriptaddr": "0x7000000"})
        uboot.source(source)
        slots.append(uboot.booted)
        assert uboot.disk_commands and all(c.startswith("virtio ") for c in uboot.disk_commands), uboot.disk_commands
        assert all(c in ("virtio dev 0", "virtio read 0x4000000 0x800 0x100", "virtio write 0x4000000 0x800 0x100")
                   for c in uboot.disk_commands), uboot.disk_commands  # fmt: skip
        assert "root=/dev/vda3 " in uboot.env["sshfwup_boot_b"]  # the board's commands came back
    assert slots == ["sshfwup_boot_b", "sshfwup_boot_a"], uboot.output
    after = env.read_sync()
    assert (after["nerves_fw_active"], after["nerves_fw_validated"], after["nerves_fw_booted"]) == ("a", "1", "1")
    assert {k: after[k] for k in board_values} == board_values


def _blank(image: Path) -> None:
    offset, size = DEFAULT_LAYOUT.uboot_env_span
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)


def _bad_crc(image: Path) -> None:
    offset, _ = DEFAULT_LAYOUT.uboot_env_span
    with open(image, "r+b") as f:
        f.seek(offset + 8)  # inside the first name=value pair: the stored CRC no longer matches
        byte = f.read(1)
        f.seek(offset + 8)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [_blank, _bad_crc], ids=["blank", "bad-crc"])
@pytest.mark.parametrize("contract", sorted(SCRIPTS))
def test_an_env_that_does_not_import_boots_slot_a_and_is_not_overwritten(contract: str, damage, tmp_path: Path) -> None:
    """`env import -c` fails on a blank area or a bad CRC, and U-Boot's own environment is then
    all there is: the script must not write that to the disk. It boots slot a and writes nothing."""
    image, _ = env_image(tmp_path, {**BOOTCOUNT_BASE, "nerves_fw_active": "b", "upgrade_available": "1"})
    damage(image)
    before = image.read_bytes()
    uboot = UBoot(image, env=dict(BOARD))
    uboot.source(SCRIPTS[contract].read_text())
    assert uboot.booted == "sshfwup_boot_a", uboot.output
    assert image.read_bytes() == before, "the script wrote the disk's environment area"
    assert "## Error: bad CRC, import failed" in uboot.output
    assert any("no valid environment" in line and "writing nothing" in line for line in uboot.output), uboot.output
    assert uboot.env == {**BOARD, "filesize": uboot.env["filesize"]}  # the board's environment, untouched
