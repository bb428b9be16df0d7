"""The fwup-ops backend on a disk image with the real fwup and deploy/examples/tryboot-like's
firmware and ops archive: what it reads (status task, reboot parameter, running slot), which task
each change runs, where reboot_param() writes, what a failing task says; its [boot] settings as
loaded; and the simulated Pi-like firmware's decision."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from sshfwup.boot.bootenv import BootEnv
from sshfwup.boot.fwup_ops import FWUP_DEFAULT_REBOOT_PARAM_PATHS, FwupOps, OpsSettings, OpsTaskError
from sshfwup.config import ConfigError, parse_config
from sshfwup.sim.tryboot import TrybootError, choose_tryboot

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy/examples/tryboot-like"
AUTOBOOT = 2304  # the autoboot FAT's first block (common.conf)
SLOTS_BY_PARTITION = {2: "a", 3: "b"}
DEFAULT_A = (EXAMPLE / "autoboot-a.txt").read_text()


class Disk:
    """A tryboot-like disk image and a backend over it. The running slot is a stand-in for the
    mount table (``running``), set by the test as a boot would."""

    def __init__(self, fwup: str, tmp: Path, **tasks: str) -> None:
        self.fwup, self.tmp = fwup, tmp
        self.image = tmp / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(80 * 1024 * 1024)
        (tmp / "fw_env.config").write_text(f"{self.image} 0x100000 0x20000\n")
        self.env = BootEnv(tmp / "fw_env.config")
        self.ops = tmp / "ops.fw"
        subprocess.run([fwup, "-c", "-f", str(EXAMPLE / "ops.conf"), "-o", str(self.ops)], check=True,
                       capture_output=True)  # fmt: skip
        self.reboot_param = tmp / "reboot-param"
        self.running: str | None = "a"
        names = {"validate_task": "validate.{slot}", "revert_task": "revert.{slot}", "tryboot_task": "tryboot.{slot}",
                 "prevent_revert_task": "prevent-revert.{slot}", **tasks}  # fmt: skip
        settings = OpsSettings(fwup=fwup, archive=self.ops, device=self.image, reboot_param_path=self.reboot_param,
                               **names)  # fmt: skip
        self.contract = FwupOps(self.env, settings=settings, running=lambda: self.running)

    def build(self, version: str) -> Path:
        rootfs = self.tmp / f"rootfs-{version}"
        rootfs.write_bytes(version.encode() * 50000)
        out = self.tmp / f"{version}.fw"
        subprocess.run([self.fwup, "-c", "-f", str(EXAMPLE / "fwup.conf"), "-o", str(out)], check=True,
                       capture_output=True, env=dict(os.environ, ROOTFS=str(rootfs), NERVES_FW_VERSION=version))  # fmt: skip
        return out

    def apply(self, fw: Path, task: str) -> None:
        subprocess.run([self.fwup, "-a", "-d", str(self.image), "-i", str(fw), "-t", task, "-q", "-U",
                        "--reboot-param-path", str(self.reboot_param)], check=True, capture_output=True)  # fmt: skip

    def boot(self) -> str:
        """The Pi-like firmware's choice; the restart uses the parameter up."""
        autoboot = subprocess.run(["mtype", "-i", f"{self.image}@@{AUTOBOOT * 512}", "::autoboot.txt"],
                                  check=True, capture_output=True, text=True).stdout  # fmt: skip
        param = self.reboot_param.read_text() if self.reboot_param.exists() else ""
        self.reboot_param.unlink(missing_ok=True)
        self.running = choose_tryboot(autoboot, param, SLOTS_BY_PARTITION).slot
        return self.running

    async def summary(self) -> tuple[str | None, bool, bool]:
        s = await self.contract.state()
        return s.active, s.validated, s.trial


@pytest.fixture
def disk(fwup: str, tmp_path: Path) -> Disk:
    d = Disk(fwup, tmp_path)
    d.apply(d.build("1.0.0"), "complete")
    return d


def host_reboot_params() -> dict[str, Any]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) if p.exists() else None for p in FWUP_DEFAULT_REBOOT_PARAM_PATHS}


async def test_the_tryboot_flow_through_the_ops_archive(disk: Disk) -> None:
    host = host_reboot_params()
    assert await disk.summary() == ("a", True, False)
    assert disk.boot() == "a"
    disk.apply(disk.build("2.0.0"), "upgrade")
    assert disk.reboot_param.read_text() == "0 tryboot"  # where --reboot-param-path said
    assert await disk.summary() == ("b", False, True)  # the tryboot is pending
    assert disk.boot() == "b"  # once
    assert await disk.summary() == ("b", False, True)  # running the trial
    await disk.contract.validate()
    assert await disk.summary() == ("b", True, False)
    assert [disk.boot() for _ in range(3)] == ["b"] * 3  # validated: it stays
    # unproven revert: a boots once, and never validated, b comes back on its own
    await disk.contract.revert_to("a", proven=False)
    assert await disk.summary() == ("a", False, True)
    assert disk.boot() == "a" and await disk.summary() == ("a", False, True)
    assert disk.boot() == "b"
    # proven revert: a boots by default from now on
    await disk.contract.revert_to("a")
    assert await disk.summary() == ("a", True, False)
    assert disk.boot() == "a"
    env = await disk.env.read()
    assert "nerves_fw_active" not in env and "upgrade_available" not in env  # keys this system never had
    assert host_reboot_params() == host  # the host's /run/systemd/reboot-param and /run/reboot-param


async def test_a_proven_revert_to_the_running_slot_cancels_a_pending_tryboot(disk: Disk) -> None:
    disk.apply(disk.build("2.0.0"), "upgrade")
    await disk.contract.revert_to("a", also={"b.sshfwup_state": "rolled-back"})
    assert await disk.summary() == ("a", True, False)
    assert disk.reboot_param.read_text() == "0" and disk.boot() == "a"
    assert (await disk.contract.state()).slots["b"].state == "rolled-back"


async def test_prevent_revert_removes_what_revert_needs(disk: Disk) -> None:
    disk.apply(disk.build("2.0.0"), "upgrade")
    disk.boot()
    await disk.contract.validate()  # b runs, validated; a holds 1.0.0
    await disk.contract.prevent("a", "rolled-back")
    before = await disk.env.read()
    with pytest.raises(OpsTaskError, match=r"revert\.a .*nothing to revert to.*; nothing was changed"):
        await disk.contract.revert_to("a")
    assert await disk.env.read() == before


async def test_a_missing_task_or_archive_says_nothing_changed(disk: Disk, fwup: str, tmp_path: Path) -> None:
    before = await disk.env.read()
    disk.contract.settings = OpsSettings(fwup=fwup, archive=disk.ops, device=disk.image,
                                         reboot_param_path=disk.reboot_param, validate_task="check-{slot}")  # fmt: skip
    with pytest.raises(OpsTaskError, match=r"fwup -t check-a of ops\.fw failed: Couldn't find applicable task"
                                           r" 'check-a'.*; nothing was changed"):  # fmt: skip
        await disk.contract.validate()
    disk.contract.settings = OpsSettings(fwup=fwup, archive=tmp_path / "none.fw", device=disk.image,
                                         reboot_param_path=disk.reboot_param)  # fmt: skip
    with pytest.raises(OpsTaskError, match=r"ops archive .*none\.fw is missing .*nothing was changed"):
        await disk.contract.validate()
    assert await disk.env.read() == before and not disk.reboot_param.exists()


async def test_without_a_running_slot_nothing_runs(disk: Disk) -> None:
    disk.running = None
    with pytest.raises(OpsTaskError, match="neither slot is mounted as the root filesystem; nothing was changed"):
        await disk.contract.validate()


def test_the_firmware_boots_tryboot_once_and_otherwise_the_default() -> None:
    assert choose_tryboot(DEFAULT_A, "", SLOTS_BY_PARTITION).slot == "a"
    assert choose_tryboot(DEFAULT_A, "0", SLOTS_BY_PARTITION).slot == "a"
    assert choose_tryboot(DEFAULT_A, "0 tryboot", SLOTS_BY_PARTITION).slot == "b"
    # without tryboot_a_b=1 the firmware has no [tryboot] partition to go to
    assert choose_tryboot("[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n", "0 tryboot",
                          SLOTS_BY_PARTITION).slot == "a"  # fmt: skip
    with pytest.raises(TrybootError, match="boot_partition=4 is not a slot's partition"):
        choose_tryboot("[all]\nboot_partition=4\n", "", SLOTS_BY_PARTITION)
    with pytest.raises(TrybootError, match="names no boot_partition"):
        choose_tryboot("", "", SLOTS_BY_PARTITION)


def test_the_example_config_loads() -> None:
    path = EXAMPLE / "sshfwup.toml"
    config = parse_config(tomllib.loads(path.read_text()), source=path)
    assert config.boot.contract == "fwup-ops" and config.boot.validate_task == "validate.{slot}"
    assert config.boot.ops_archive == Path("/usr/share/fwup/ops.fw")


@pytest.mark.parametrize(("boot", "says"), [
    ({"contract": "uboot-nerves", "ops_archive": "/x/ops.fw"}, 'ops_archive: only used with contract = "fwup-ops"'),
    ({"contract": "fwup-ops", "validate_task": ""}, "validate_task: the fwup-ops contract needs this task"),
    ({"contract": "fwup-ops", "revert_task": "revert.{other}"}, "the only placeholders are {slot} and {running}"),
    ({"contract": "fwup-ops", "status_task": "status now"}, "contains white space"),
    ({"contract": "fwup-ops", "reboot_param_path": "run/reboot-param"}, "reboot_param_path: must be an absolute path"),
    ({"contract": "fwup-ops", "ops_timeout": 0}, "ops_timeout: must be more than 0 seconds"),
])  # fmt: skip
def test_bad_ops_settings_are_refused_at_load(boot: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=f"\\[boot\\] .*{says.replace('{', '[{]').replace('}', '[}]')}"):
        parse_config({"boot": boot})
