"""The QEMU device's host-side parts that need no VM: tool checks, leftovers, the device's lock,
and deploy/vm/fwup.conf applied by the real fwup (these run in the default suite)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sshfwup.vm.debpkg import runtime_lock
from sshfwup.vm.errors import ToolMissing
from sshfwup.vm.leftovers import clear_run_dir, qemu_pid
from sshfwup.vm.tools import require

REPO = Path(__file__).resolve().parents[2]


def test_missing_tools_are_named_in_one_message() -> None:
    with pytest.raises(ToolMissing) as e:
        require({"no-such-qemu": "qemu-system-x86", "no-such-img": "qemu-utils", "sh": "dash"}, what="running the VM")
    assert "qemu-system-x86, qemu-utils" in str(e.value) and "apt-get install qemu-system-x86 qemu-utils" in str(e.value)


def test_a_pidfile_of_another_process_is_not_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "qemu.pid").write_text(f"{os.getpid()}\n")  # alive, but not QEMU on this overlay
    (run / "overlay.qcow2").write_bytes(b"")
    assert qemu_pid(run) is None
    assert clear_run_dir(run) is True  # the overlay was left: removed
    assert not run.exists() and clear_run_dir(run) is False


def test_the_device_gets_exactly_the_locked_runtime_dependencies() -> None:
    text = runtime_lock((REPO / "requirements-lock.txt").read_text())
    names = {line.split("==")[0] for line in text.splitlines() if line[:1].strip()}
    assert {"asyncssh", "anyio", "cryptography"} <= names
    assert not names & {"pytest", "ansible-core", "hypothesis", "tqdm"}
    assert "--hash=sha256:" in text


def test_vm_fwup_conf_writes_the_boot_partition_and_env(fwup: str, tmp_path: Path) -> None:
    files = {}
    for name, size in (("KERNEL", 300_000), ("INITRD", 200_000), ("BOOT_SCR", 100)):
        files[name] = tmp_path / name.lower()
        files[name].write_bytes(os.urandom(size))
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "hello").write_text("hi\n")
    subprocess.run(["mksquashfs", str(tmp_path / "root"), str(tmp_path / "rootfs.sq"), "-quiet", "-noappend"], check=True)
    env = {**os.environ, **{k: str(v) for k, v in files.items()}, "ROOTFS": str(tmp_path / "rootfs.sq")}
    conf = REPO / "deploy/vm/fwup.conf"
    subprocess.run([fwup, "-c", "-f", str(conf), "-o", str(tmp_path / "t.fw")], env=env, check=True, capture_output=True)
    disk = tmp_path / "disk.img"
    subprocess.run([fwup, "-a", "-q", "-d", str(disk), "-i", str(tmp_path / "t.fw"), "-t", "complete"], check=True)
    cfg = tmp_path / "fw_env.config"
    cfg.write_text((REPO / "deploy/vm/fw_env.config").read_text().replace("/dev/vda", str(disk)))
    printed = subprocess.run(["fw_printenv", "-c", str(cfg)], capture_output=True, text=True, check=True).stdout
    for line in ("nerves_fw_active=a", "nerves_fw_validated=1", "upgrade_available=0", "bootcount=0", "bootlimit=3",
                 "a.nerves_fw_platform=sshfwup-qemu", "nerves_fw_devpath=/dev/vda"):  # fmt: skip
        assert line in printed.splitlines()
    with disk.open("rb") as f:  # the MBR: p1 bootable FAT (0x0c), p2..p4 Linux
        mbr = f.read(512)
    assert [mbr[446 + 16 * i] for i in range(4)] == [0x80, 0, 0, 0]
    assert [mbr[446 + 16 * i + 4] for i in range(4)] == [0x0C, 0x83, 0x83, 0x83]


def test_the_vm_model_sample_is_replayable_and_walkable_on_the_qemu_device() -> None:
    """tests/vm/test_vm_model.py's draw: the same seed draws the same pairs, the always-walked ones
    last, and every drawn pair is a possible pair of the device's contract in a state the walk
    reaches on purpose there, with an event its firmware pool drives."""
    from model import space
    from safety_model.vm_device import ALWAYS, VM_EVENTS, VM_STATES, vm_sample

    from sshfwup.vm.contracts import DEFAULT_CONTRACT as CONTRACT

    contract_space = space(CONTRACT)
    first, again = vm_sample(contract_space, 7, 4), vm_sample(contract_space, 7, 4)
    assert first == again and first[-len(ALWAYS) :] == ALWAYS and len(first) == len(ALWAYS) + 4
    assert all(p in contract_space.pairs for p in first), first
    assert all(s in VM_STATES and e in VM_EVENTS for s, e in first[: -len(ALWAYS)]), first
    assert vm_sample(contract_space, 8, 4) != first  # another seed, another draw


def test_the_vm_model_firmware_pool_hands_out_rising_versions_of_the_family_asked(tmp_path: Path) -> None:
    """A hot firmware is the next version of the running firmware's family, a reboot-requiring one
    the next of the other family; versions only rise (a skipped one is never handed out later), the
    pool builds more when its prebuilt ones run out, and refuses what it cannot build."""
    from safety_model.vm_device import FirmwarePool, UnsupportedFirmware, VmFirmwares

    from sshfwup.vm.image import VmDir

    class Recorded(FirmwarePool):
        def _build(self, version: str, family: str) -> Path:  # no mksquashfs: a file naming what it is
            path = tmp_path / f"{version}-{family}.fw"
            path.write_text(f"{version} {family}\n")
            return path

    pool = Recorded(VmDir(tmp_path), prebuild=4)  # 1.1.0 rel, 1.2.0 plain, 1.3.0 rel, 1.4.0 plain
    running = ["1.0.0"]  # the factory's firmware: "plain"
    firmwares = VmFirmwares(pool, lambda: running[0])
    try:
        hot = firmwares.make(filler=1024)
        reboot = firmwares.make(changes=("system-file",))
        running[0] = reboot[0]
        hot_after = firmwares.make()
        with pytest.raises(UnsupportedFirmware, match="app_behavior"):
            firmwares.make(app_behavior={"never_ready": True})
    finally:
        pool.close()
    assert [(v, p.read_text().split()[1]) for v, p in (hot, reboot, hot_after)] == [
        ("1.2.0", "plain"), ("1.3.0", "rel"), ("1.5.0", "rel")]  # fmt: skip
    assert firmwares.by_version["1.3.0"] == reboot[1] and "1.1.0" not in firmwares.by_version
