"""The QEMU device's firmware and disk: the cached rootfs configured for the device, packed by
``sshfwup firmware build``'s code with ``deploy/vm/fwup.conf``, and the disk written by the real
``fwup -t complete``.

A VM directory (``sshfwup vm build DIR``) holds:

- ``staging/``     the root filesystem the firmware is built from (edit it, ``sshfwup vm firmware``)
- ``boot.cmd``     deploy/vm/board.cmd followed by the script shipped for the boot contract
                   (``deploy/uboot/<script>/boot.cmd``, sshfwup/vm/contracts.py), unchanged
- ``boot.scr``     boot.cmd compiled by mkimage
- ``id_ed25519``   the SSH key the device trusts (its public half is in the firmware)
- ``fw/``          the firmware files built (``<version>.fw``)
- ``disk.img``     the factory disk (raw, sparse): ``fwup -a -t complete`` of the first firmware
- ``dpkg-l.txt``   ``dpkg -l`` of the root filesystem (packages float: this records them)
- ``vm.json``      what was built, with the boot contract (``--contract``), which
                   ``sshfwup vm firmware`` builds for again
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sshfwup.host.firmware_build import BuildError, Built, build_release
from sshfwup.update.fwhead import MAX_HEAD, read_head_bytes
from sshfwup.update.installed import record
from sshfwup.vm.contracts import DEFAULT_CONTRACT, OPS_ARCHIVE, VmContract, vm_contract
from sshfwup.vm.errors import VmError
from sshfwup.vm.rootfs import cached_rootfs, unpack
from sshfwup.vm.tools import BUILD_TOOLS, require

log = logging.getLogger(__name__)

__all__ = ["APP_USER", "VmDir", "build_vm", "firmware"]

APP_USER = "sshfwup-app"
FIRST_VERSION = "1.0.0"


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class VmDir:
    """The files of one VM directory (see the module docstring)."""

    path: Path

    @property
    def staging(self) -> Path:
        return self.path / "staging"

    @property
    def boot_scr(self) -> Path:
        return self.path / "boot.scr"

    @property
    def key(self) -> Path:
        return self.path / "id_ed25519"

    @property
    def disk(self) -> Path:
        return self.path / "disk.img"

    @property
    def fw_dir(self) -> Path:
        return self.path / "fw"

    @property
    def info(self) -> Path:
        return self.path / "vm.json"

    @property
    def contract(self) -> VmContract:
        """The boot contract the directory was built for (vm.json; older builds: the default)."""
        try:
            name = json.loads(self.info.read_text()).get("contract", DEFAULT_CONTRACT)
        except FileNotFoundError:
            return vm_contract(DEFAULT_CONTRACT)
        except (OSError, ValueError, AttributeError) as e:
            raise VmError(f"{self.info}: unreadable ({e}): rebuild with `sshfwup vm build {self.path}`") from None
        return vm_contract(str(name))

    def check_built(self) -> None:
        if not self.disk.is_file() or not self.key.is_file():
            raise VmError(f"{self.path} holds no built VM: run `sshfwup vm build {self.path}` first")


def _run(argv: list[str], *, what: str, timeout: float = 600) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise VmError(f"{what}: no result within {timeout:.0f} s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise VmError(f"{what} failed (exit status {result.returncode}):\n{tail}")
    return result.stdout


def _kernel_files(staging: Path) -> tuple[Path, Path]:
    kernels = sorted((staging / "boot").glob("vmlinuz-*"))
    initrds = sorted((staging / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise VmError(f"{staging}/boot has no vmlinuz-*/initrd.img-*: the rootfs lacks its kernel")
    return kernels[-1], initrds[-1]


def sshfwup_toml(contract: VmContract) -> str:
    """The device's /etc/sshfwup.toml: deploy/vm/sshfwup.toml, then the contract's [boot] section."""
    root = repo_root()
    text = (root / "deploy/vm/sshfwup.toml").read_text()
    if contract.boot_section is None:
        return text
    return f"{text.rstrip()}\n\n# --- {contract.boot_section} ---\n{(root / contract.boot_section).read_text()}"


def build_ops_archive(contract: VmContract, out: Path, *, fwup: str) -> None:
    """``fwup -c`` of the contract's ops.conf into ``out`` (nothing for a contract without one)."""
    if contract.ops_conf is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([fwup, "-c", "-f", str(repo_root() / contract.ops_conf), "-o", str(out)],
         what=f"fwup -c of {contract.ops_conf}")  # fmt: skip


def configure(staging: Path, public_key: str, *, fwup: str, contract: VmContract) -> None:
    """Make the unpacked Debian tree the device: fwup, config, mounts, network, app, app user, and
    what the boot contract adds (its [boot] section, the ops archive)."""
    deploy = repo_root() / "deploy"
    shutil.copy2(fwup, staging / "usr/local/bin/fwup")
    _run(["chroot", str(staging), "/usr/local/bin/fwup", "--version"], what="fwup in the guest")
    (staging / "etc/sshfwup.toml").write_text(sshfwup_toml(contract))
    build_ops_archive(contract, staging / OPS_ARCHIVE, fwup=fwup)
    shutil.copy2(deploy / "vm/fw_env.config", staging / "etc/fw_env.config")
    shutil.copy2(deploy / "vm/fstab", staging / "etc/fstab")
    (staging / "etc/systemd/network").mkdir(parents=True, exist_ok=True)
    shutil.copy2(deploy / "vm/10-qemu.network", staging / "etc/systemd/network/10-qemu.network")
    (staging / "etc/sshfwup").mkdir(exist_ok=True)
    (staging / "etc/sshfwup/authorized_keys").write_text(public_key.strip() + "\n")
    (staging / "etc/hostname").write_text("sshfwup-vm\n")
    (staging / "etc/machine-id").write_text("")  # systemd makes one in /run at each boot (ro root)
    (staging / "data").mkdir(exist_ok=True)
    app = staging / "srv/app"
    if app.exists():
        shutil.rmtree(app)
    shutil.copytree(repo_root() / "sshfwup/sim/sample_app", app, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "VERSION").write_text(FIRST_VERSION + "\n")
    have_user = subprocess.run(["chroot", str(staging), "id", APP_USER], capture_output=True, check=False)
    if have_user.returncode != 0:
        _run(["chroot", str(staging), "useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
              APP_USER], what=f"adding the app user {APP_USER}")  # fmt: skip
    # a root login without password on the serial console only (a test VM: `--console` debugging)
    _run(["chroot", str(staging), "passwd", "-d", "root"], what="opening the console login")
    _run(["systemctl", f"--root={staging}", "enable", "sshfwup.service", "systemd-networkd.service"],
         what="enabling sshfwup and systemd-networkd")  # fmt: skip


def firmware(vm: VmDir, version: str, *, out: Path | None = None) -> Built:
    """Build ``fw/<version>.fw`` from ``staging/`` with deploy/vm/fwup.conf for the directory's
    boot contract: the kernel and initrd of the tree go to the boot partition, the tree itself to
    the slot."""
    kernel, initrd = _kernel_files(vm.staging)
    contract = vm.contract
    if not vm.boot_scr.is_file():
        compile_boot_script(vm, contract)
    (vm.staging / "srv/app/VERSION").write_text(version + "\n")
    out = out or vm.fw_dir / f"{version}.fw"
    try:
        return build_release(
            vm.staging, out, version=version, hot=True, conf=repo_root() / "deploy/vm/fwup.conf",
            kernel="/" + str(kernel.relative_to(vm.staging)),
            variables={"KERNEL": str(kernel), "INITRD": str(initrd), "BOOT_SCR": str(vm.boot_scr),
                       **contract.fwup_variables(repo_root())},
        )  # fmt: skip
    except BuildError as e:
        raise VmError(f"building firmware {version}: {e}") from None


def boot_script_source(contract: VmContract) -> str:
    """The QEMU device's boot script: its board parts (the commands that boot a slot, the
    script's board variables where they differ), then the script shipped for the contract,
    exactly as boards get it."""
    root = repo_root()
    parts = [(root / part).read_text().rstrip() for part in contract.board_parts]
    shipped = (root / contract.shipped_script).read_text()
    return "\n\n".join(parts) + f"\n\n# --- {contract.shipped_script} ---\n{shipped}"


def compile_boot_script(vm: VmDir, contract: VmContract) -> None:
    source = vm.path / "boot.cmd"
    source.write_text(boot_script_source(contract))
    _run(["mkimage", "-A", "x86", "-O", "linux", "-T", "script", "-C", "none", "-n", "sshfwup A/B",
          "-d", str(source), str(vm.boot_scr)], what="mkimage of boot.cmd")  # fmt: skip


def _factory_data(disk: Path, fw: Path) -> None:
    """The data partition as a factory leaves it (as ``sshfwup sim create`` does): ext4 holding
    sshfwup's record of the flashed firmware's resources (``firmware/a.json``), without which the
    first update could never be hot — boot.scr, kernel and initrd would count as changed."""
    with disk.open("rb") as f:
        mbr = f.read(512)
    entry = mbr[446 + 16 * 3 : 446 + 16 * 4]  # partition 4: data
    start, count = int.from_bytes(entry[8:12], "little"), int.from_bytes(entry[12:16], "little")
    if entry[4] != 0x83 or count == 0:
        raise VmError(f"{disk}: partition 4 is not the Linux data partition deploy/vm/fwup.conf makes")
    head = read_head_bytes(fw.read_bytes()[:MAX_HEAD], final=True)
    if head is None:
        raise VmError(f"{fw}: no fwup meta.conf at its start")
    with tempfile.TemporaryDirectory(prefix="sshfwup-vm-data-") as tmp:
        data_dir = Path(tmp) / "data"
        record(data_dir / "sshfwup", "a", head.uuid, head.version, head.resources)
        _run(["mkfs.ext4", "-q", "-F", "-L", "appdata", "-d", str(data_dir), "-E", f"offset={start * 512}",
              str(disk), f"{count * 512 // 1024}k"], what="mkfs.ext4 of the data partition")  # fmt: skip


def build_vm(path: Path, *, contract: str = DEFAULT_CONTRACT, rebuild_rootfs: bool = False) -> VmDir:
    """``sshfwup vm build DIR``: rootfs (cached), firmware 1.0.0 for the boot contract, and the
    disk by ``fwup -t complete``."""
    chosen = vm_contract(contract)
    tools = require(BUILD_TOOLS, what="building the VM")
    vm = VmDir(Path(path).resolve())
    vm.path.mkdir(parents=True, exist_ok=True)
    vm.info.write_text(json.dumps({"contract": chosen.name}) + "\n")  # what firmware() builds for
    entry = cached_rootfs(repo_root(), rebuild=rebuild_rootfs)
    shutil.copy2(entry.dpkg_list, vm.path / "dpkg-l.txt")
    unpack(entry, vm.staging)
    if not vm.key.is_file():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "sshfwup-vm", "-f", str(vm.key)],
             what="making the VM's SSH key")  # fmt: skip
    configure(vm.staging, vm.key.with_suffix(".pub").read_text(), fwup=tools["fwup"], contract=chosen)
    compile_boot_script(vm, chosen)
    built = firmware(vm, FIRST_VERSION)
    partial = vm.disk.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    _run([tools["fwup"], "-a", "-q", "-d", str(partial), "-i", str(built.path), "-t", "complete"],
         what="fwup -t complete")  # fmt: skip
    _factory_data(partial, built.path)
    partial.replace(vm.disk)
    vm.info.write_text(json.dumps({"contract": chosen.name, "rootfs_key": entry.key, "deb": str(entry.deb),
                                   "firmware": str(built.path), "version": built.version, "uuid": built.uuid},
                                  indent=2) + "\n")  # fmt: skip
    log.info("VM built in %s: %s (firmware %s, boot contract %s)", vm.path, vm.disk, built.version, chosen.name)
    return vm
