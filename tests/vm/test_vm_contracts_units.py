"""The QEMU device's boot contracts without a VM (default suite): each contract's boot script, its
/etc/sshfwup.toml as sshfwup loads it, deploy/vm/fwup.conf built with the contract's values and
applied by the real fwup to a disk image, and the fwup-ops device's ops archive (deploy/vm/ops.conf)
driven by sshfwup's own fwup-ops backend on that image. The U-Boot scripts themselves run in the
shell emulator (tests/boot/test_boot_scripts.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import pytest

from sshfwup.boot.backends import CONTRACTS as BACKENDS
from sshfwup.boot.bootenv import BootEnv
from sshfwup.boot.fwup_ops import FwupOps, OpsSettings, OpsTaskError
from sshfwup.config import load_config
from sshfwup.vm.cli import build_parser
from sshfwup.vm.contracts import CONTRACTS, OPS_ARCHIVE, VmContract, vm_contract
from sshfwup.vm.errors import VmError
from sshfwup.vm.image import VmDir, boot_script_source, build_ops_archive, sshfwup_toml

REPO = Path(__file__).resolve().parents[2]
NERVES_CONTRACTS = ("uboot-nerves", "fwup-ops")


def test_the_vm_knows_every_contract_sshfwup_has() -> None:
    assert tuple(CONTRACTS) == BACKENDS
    with pytest.raises(VmError, match="unknown boot contract 'tryboot'.*known: uboot-bootcount, uboot-nerves, fwup-ops"):
        vm_contract("tryboot")


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_the_boot_script_is_the_board_parts_then_the_shipped_script_unchanged(name: str) -> None:
    contract = vm_contract(name)
    source = boot_script_source(contract)
    shipped = (REPO / contract.shipped_script).read_text()
    assert source.endswith(f"# --- {contract.shipped_script} ---\n{shipped}")
    assert source.startswith((REPO / "deploy/vm/board.cmd").read_text().rstrip())
    expected = "deploy/uboot/bootcount/boot.cmd" if name == "uboot-bootcount" else "deploy/uboot/nerves/boot.cmd"
    assert contract.shipped_script == expected


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_the_device_config_loads_and_names_its_contract(name: str, tmp_path: Path) -> None:
    path = tmp_path / "sshfwup.toml"
    path.write_text(sshfwup_toml(vm_contract(name)))
    config = load_config(path)
    assert config.boot.contract == name
    assert str(config.fwup.devpath) == "/dev/vda"  # the rest of deploy/vm/sshfwup.toml is there too
    if name == "fwup-ops":
        assert str(config.boot.ops_archive) == "/" + OPS_ARCHIVE and config.boot.ops_device == "/dev/vda"
        assert config.boot.validate_task == "validate.{slot}" and config.boot.tryboot_task == "tryboot.{slot}"


def test_vm_json_names_the_contract_firmware_builds_for(tmp_path: Path) -> None:
    vm = VmDir(tmp_path)
    assert vm.contract.name == "uboot-bootcount"  # a directory built before --contract existed
    vm.info.write_text(json.dumps({"contract": "fwup-ops", "version": "1.0.0"}))
    assert vm.contract is CONTRACTS["fwup-ops"]
    vm.info.write_text(json.dumps({"contract": "grub"}))
    with pytest.raises(VmError, match="unknown boot contract 'grub'"):
        _ = vm.contract


def test_vm_build_takes_the_contract_and_defaults_to_bootcount() -> None:
    parser = build_parser()
    assert parser.parse_args(["build", "/tmp/x"]).contract == "uboot-bootcount"
    assert parser.parse_args(["build", "/tmp/x", "--contract", "fwup-ops"]).contract == "fwup-ops"
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "/tmp/x", "--contract", "tryboot"])


def test_the_nerves_board_values_agree_in_u_boot_and_in_the_factory_env() -> None:
    """deploy/vm/board-nerves.cmd (U-Boot's environment) and the factory env fwup writes hold the
    same values, and they are the bootcount script's own (which fit this VM)."""
    board = dict(line.split()[1:3] for line in (REPO / "deploy/vm/board-nerves.cmd").read_text().splitlines()
                 if line.startswith("setenv "))  # fmt: skip
    factory = {}
    for line in (REPO / "deploy/vm/contracts/factory-env-nerves.conf").read_text().splitlines():
        if line.startswith("uboot_setenv("):
            _, key, value = (part.strip().strip('")') for part in line.split(","))
            factory[key] = value
    bootcount = dict(line.split("=", 1) for line in (REPO / "deploy/uboot/bootcount/boot.cmd").read_text().splitlines()
                     if line.split("=", 1)[0] in board)  # fmt: skip
    assert board == factory == bootcount and set(board) == {"disk_if", "disk_dev", "env_addr", "env_blk", "env_cnt",
                                                            "env_size", "board_addr"}  # fmt: skip


# --- deploy/vm/fwup.conf per contract, applied by the real fwup --------------------------------


class VmDisk:
    """A disk image written by ``fwup -t complete`` of deploy/vm/fwup.conf built for a contract."""

    def __init__(self, fwup: str, tmp: Path, contract: VmContract) -> None:
        self.fwup, self.tmp, self.contract = fwup, tmp, contract
        self.image = tmp / "disk.img"
        self.reboot_param = tmp / "reboot-param"
        self.config = tmp / "fw_env.config"
        self.config.write_text((REPO / "deploy/vm/fw_env.config").read_text().replace("/dev/vda", str(self.image)))
        self.apply(self.build("1.0.0"), "complete")

    def build(self, version: str) -> Path:
        files = {}
        for name, size in (("KERNEL", 3000), ("INITRD", 2000), ("BOOT_SCR", 100)):
            files[name] = self.tmp / f"{name.lower()}-{version}"
            files[name].write_bytes(os.urandom(size))
        root = self.tmp / f"root-{version}"
        root.mkdir()
        (root / "VERSION").write_text(version)
        squashfs = self.tmp / f"rootfs-{version}.sq"
        subprocess.run(["mksquashfs", str(root), str(squashfs), "-quiet", "-noappend"], check=True, capture_output=True)
        env = {**os.environ, **{k: str(v) for k, v in files.items()}, "ROOTFS": str(squashfs),
               "NERVES_FW_VERSION": version, **self.contract.fwup_variables(REPO)}  # fmt: skip
        out = self.tmp / f"{version}.fw"
        subprocess.run([self.fwup, "-c", "-f", str(REPO / "deploy/vm/fwup.conf"), "-o", str(out)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        return out

    def apply(self, fw: Path, task: str) -> None:
        subprocess.run([self.fwup, "-a", "-q", "-U", "-d", str(self.image), "-i", str(fw), "-t", task,
                        "--reboot-param-path", str(self.reboot_param)], check=True, capture_output=True)  # fmt: skip

    def env(self) -> dict[str, str]:
        out = subprocess.run(["fw_printenv", "-c", str(self.config)], capture_output=True, text=True, check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _boot_vars(env: dict[str, str]) -> tuple[str, str, str]:
    return env["nerves_fw_active"], env["nerves_fw_validated"], env["nerves_fw_booted"]


@pytest.mark.parametrize("name", NERVES_CONTRACTS)
def test_the_nerves_contracts_factory_env_and_upgrade(name: str, fwup: str, tmp_path: Path) -> None:
    """The factory env has nerves_fw_autovalidate=0 (sshfwup validates, not U-Boot) and the board
    values; an upgrade writes the trial the nerves script reads, and under fwup-ops also the
    reboot parameter "0 tryboot" sshfwup reads as a pending one-shot trial."""
    disk = VmDisk(fwup, tmp_path, vm_contract(name))
    env = disk.env()
    assert _boot_vars(env) == ("a", "1", "0") and env["nerves_fw_autovalidate"] == "0"
    assert (env["disk_if"], env["env_addr"], env["board_addr"]) == ("virtio", "0x4000000", "0x4100000")
    disk.apply(disk.build("1.1.0"), "upgrade")
    env = disk.env()
    assert _boot_vars(env) == ("b", "0", "0") and env["b.nerves_fw_version"] == "1.1.0"
    if name == "fwup-ops":
        assert disk.reboot_param.read_text() == "0 tryboot"
    else:
        assert not disk.reboot_param.exists()


def test_the_bootcount_factory_env_is_unchanged(fwup: str, tmp_path: Path) -> None:
    disk = VmDisk(fwup, tmp_path, vm_contract("uboot-bootcount"))
    env = disk.env()
    assert env["nerves_fw_autovalidate"] == "1" and "disk_if" not in env
    disk.apply(disk.build("1.1.0"), "upgrade")
    assert (disk.env()["upgrade_available"], disk.env()["bootcount"]) == ("1", "0") and not disk.reboot_param.exists()


# --- the fwup-ops device's ops archive, through sshfwup's backend ------------------------------


def test_the_ops_archive_compiles_with_every_task_sshfwup_runs(fwup: str, tmp_path: Path) -> None:
    ops = tmp_path / "ops.fw"
    build_ops_archive(vm_contract("fwup-ops"), ops, fwup=fwup)
    meta = subprocess.run([fwup, "-m", "-i", str(ops)], capture_output=True, text=True, check=True).stdout
    assert 'meta-platform="sshfwup-qemu"' in meta or "meta-platform=sshfwup-qemu" in meta, meta
    tasks = subprocess.run(["unzip", "-p", str(ops), "meta.conf"], capture_output=True, text=True, check=True).stdout
    for task in ("status.a", "status.b", "validate.a", "validate.b", "revert.a", "revert.b", "tryboot.a", "tryboot.b",
                 "prevent-revert.a", "prevent-revert.b"):  # fmt: skip
        assert f'task "{task}"' in tasks or f"task {task}" in tasks, task
    build_ops_archive(vm_contract("uboot-nerves"), tmp_path / "none.fw", fwup=fwup)
    assert not (tmp_path / "none.fw").exists()  # only fwup-ops ships one


def test_fwup_ops_on_the_vm_disk_reads_and_changes_what_u_boot_boots(fwup: str, tmp_path: Path) -> None:
    """sshfwup's fwup-ops backend with the VM's ops archive on a VM disk image: after an upgrade the
    new slot is on trial; validating it makes it the default; a revert to the unproven old slot
    is a trial the nerves script falls back from; a proven revert and prevent-revert."""
    contract = vm_contract("fwup-ops")
    disk = VmDisk(fwup, tmp_path, contract)
    ops = tmp_path / "ops.fw"
    build_ops_archive(contract, ops, fwup=fwup)
    running = {"slot": "a"}
    settings = OpsSettings(fwup=fwup, archive=ops, device=disk.image, reboot_param_path=disk.reboot_param,
                           validate_task="validate.{slot}", revert_task="revert.{slot}",
                           tryboot_task="tryboot.{slot}", prevent_revert_task="prevent-revert.{slot}")  # fmt: skip
    backend = FwupOps(BootEnv(disk.config), settings=settings, running=lambda: running["slot"])

    def state() -> tuple[str | None, bool, bool]:
        s = anyio.run(backend.state)
        return s.active, s.validated, s.trial

    assert state() == ("a", True, False)
    disk.apply(disk.build("1.1.0"), "upgrade")
    assert state() == ("b", False, True)  # b boots next, once, on trial
    running["slot"] = "b"  # U-Boot booted b: its first boot (nerves_fw_booted=1)
    subprocess.run(["fw_setenv", "-c", str(disk.config), "nerves_fw_booted", "1"], check=True)
    disk.reboot_param.unlink()  # /run is gone after the restart
    assert state() == ("b", False, True)  # running on trial: U-Boot falls back to a unless it validates
    anyio.run(backend.validate)
    assert state() == ("b", True, False) and _boot_vars(disk.env()) == ("b", "1", "1")
    assert disk.reboot_param.read_text() == "0"

    anyio.run(lambda: backend.revert_to("a", proven=False))  # tryboot.a: a's first boot, once
    assert _boot_vars(disk.env()) == ("a", "0", "0") and disk.reboot_param.read_text() == "0 tryboot"
    assert state() == ("a", False, True)
    anyio.run(lambda: backend.revert_to("b"))  # still on b: keep b (validate.b), no trial pending
    assert state() == ("b", True, False) and disk.reboot_param.read_text() == "0"

    running["slot"] = "a"  # as if a ran while b was validated: a proven revert to b is revert.b
    anyio.run(lambda: backend.revert_to("b", proven=True))
    assert _boot_vars(disk.env())[:2] == ("b", "1")
    anyio.run(lambda: backend.prevent("b", "rolled-back"))
    with pytest.raises(OpsTaskError, match="Partition B holds no firmware"):
        anyio.run(lambda: backend.revert_to("b", proven=True))
