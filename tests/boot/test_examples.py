"""deploy/examples/bootcount/ and nerves-bbb-like/: each fwup.conf builds with the real fwup, its
complete and upgrade tasks leave the environment its [boot] contract expects, and the contract's
boot script (deploy/uboot/*/boot.cmd, in tests/boot/uboot_shell.py) boots the trial and falls back
from it as that contract says."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

import pytest
from uboot_shell import UBoot

from sshfwup.boot.backends import make_contract
from sshfwup.boot.bootenv import BootEnv
from sshfwup.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = {"bootcount": "uboot-bootcount", "nerves-bbb-like": "uboot-nerves"}
SCRIPT = {"uboot-bootcount": ROOT / "deploy/uboot/bootcount/boot.cmd", "uboot-nerves": ROOT / "deploy/uboot/nerves/boot.cmd"}
BOARD = {"sshfwup_boot_a": "echo a", "sshfwup_boot_b": "echo b"}
BOOT_PART_OFFSET = 4096  # nerves-bbb-like's FAT partition, in blocks


def build(fwup: str, example: str, version: str, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, NERVES_FW_VERSION=version, SOURCE_DATE_EPOCH="1700000000")
    for name, var in (("rootfs", "ROOTFS"), ("MLO", "MLO"), ("u-boot.img", "UBOOT_IMG"),
                      ("boot.scr", "BOOT_SCR"), ("zImage", "ZIMAGE")):  # fmt: skip
        path = work / name
        path.write_bytes(f"{name} {version}\n".encode() * 1000)
        env[var] = str(path)
    out = work / f"{example}-{version}.fw"
    subprocess.run([fwup, "-c", "-f", str(ROOT / "deploy/examples" / example / "fwup.conf"), "-o", str(out)],
                   env=env, check=True, capture_output=True)  # fmt: skip
    return out


def apply(fwup: str, image: Path, fw: Path, task: str) -> None:
    result = subprocess.run([fwup, "-a", "-d", str(image), "-i", str(fw), "-t", task, "-q", "-U"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def boot_once(image: Path, contract: str) -> str:
    uboot = UBoot(image, env=dict(BOARD))
    uboot.source(SCRIPT[contract].read_text())
    assert uboot.booted is not None
    return uboot.booted.removeprefix("sshfwup_boot_")


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_the_example_config_names_its_contract(example: str) -> None:
    path = ROOT / "deploy/examples" / example / "sshfwup.toml"
    config = parse_config(tomllib.loads(path.read_text()), source=path)
    assert config.boot.contract == EXAMPLES[example]


@pytest.mark.parametrize("example", sorted(EXAMPLES))
async def test_the_example_layout_speaks_its_contract(example: str, fwup: str, tmp_path: Path) -> None:
    name = EXAMPLES[example]
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    (tmp_path / "fw_env.config").write_text(f"{image} 0x100000 0x20000\n")
    contract = make_contract(name, BootEnv(tmp_path / "fw_env.config"), health_gated=True)

    apply(fwup, image, build(fwup, example, "1.0.0", tmp_path / "v1"), "complete")
    state = await contract.state()
    assert (state.active, state.validated, state.trial, state.warnings) == ("a", True, False, ())
    assert state.slots["a"].version == "1.0.0" and state.slots["a"].uuid
    assert boot_once(image, name) == "a"

    v2 = build(fwup, example, "2.0.0", tmp_path / "v2")
    apply(fwup, image, v2, "upgrade")
    state = await contract.state()
    assert (state.active, state.validated, state.trial) == ("b", False, True)
    assert state.slots["b"].version == "2.0.0"
    if example == "nerves-bbb-like":  # the slot's kernel went to the FAT partition beside a's
        listing = subprocess.run(["mdir", "-b", "-i", f"{image}@@{BOOT_PART_OFFSET * 512}", "::"],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert {"::/ZIMAGE.A", "::/ZIMAGE.B", "::/MLO", "::/BOOT.SCR"} <= set(listing.upper().split()), listing

    # boots the trial; never validated, the script falls back (Nerves: one trial; bootcount: bootlimit 3)
    slots = [boot_once(image, name) for _ in range(5)]
    assert slots == (["b", "b", "b", "a", "a"] if name == "uboot-bootcount" else ["b", "a", "a", "a", "a"])
    state = await contract.state()
    assert (state.active, state.validated, state.trial) == ("a", True, False)

    # an upgrade again, validated by sshfwup during its trial: it stays
    apply(fwup, image, v2, "upgrade")
    assert boot_once(image, name) == "b"
    await contract.validate()
    assert [boot_once(image, name) for _ in range(4)] == ["b"] * 4
    # the running firmware is proven, so the next upgrade goes to a
    apply(fwup, image, build(fwup, example, "3.0.0", tmp_path / "v3"), "upgrade")
    assert (await contract.state()).active == "a"
