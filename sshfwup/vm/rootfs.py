"""The guest's root filesystem: Debian bookworm by mmdebstrap, sshfwup's .deb installed, cached.

The expensive part (mmdebstrap, the kernel's initramfs, the venv) is cached as a tar in
:data:`CACHE_DIR` keyed by the package list, requirements-lock.txt and sshfwup's sources; a build
with the same key only unpacks it (seconds). Packages float (no snapshot archive): each cache
entry has the ``dpkg -l`` of what it holds beside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sshfwup.vm.debpkg import build_and_install
from sshfwup.vm.errors import VmError

log = logging.getLogger(__name__)

__all__ = ["CACHE_DIR", "PACKAGES", "CachedRootfs", "cached_rootfs", "unpack"]

CACHE_DIR = Path(os.environ.get("SSHFWUP_VM_CACHE", "/var/cache/sshfwup-vm"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What the device runs: systemd as init, udev (the disk's device nodes), python3 for sshfwup's
# venv (python3-venv: made by the guest's own python3), fw_printenv/fw_setenv, the kernel, mkfs
# for the data partition, and fwup's shared libraries (fwup itself: the host's /usr/local/bin/fwup,
# built by scripts/bootstrap.sh from the same Debian release), and QEMU's guest agent: the tests'
# root shell on the device (sshfwup's SSH offers only its own commands).
PACKAGES = (
    "systemd-sysv", "udev", "python3", "python3-venv", "libubootenv-tool", "linux-image-cloud-amd64",
    "e2fsprogs", "kmod", "iproute2", "libconfuse2", "libarchive13", "procps", "qemu-guest-agent",
)  # fmt: skip
# the initramfs must mount a squashfs root from a virtio disk
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "squashfs")
MMDEBSTRAP_TIMEOUT = 900


@dataclass(frozen=True)
class CachedRootfs:
    tar: Path
    dpkg_list: Path
    deb: Path
    key: str


def _device_sources(repo: Path) -> list[Path]:
    """sshfwup's sources as the device gets them (the host-side vm package is left out: editing
    it does not change the device)."""
    device = [p for p in (repo / "sshfwup").rglob("*.py") if "vm" not in p.relative_to(repo / "sshfwup").parts[:1]]
    return [*device, Path(__file__), Path(__file__).with_name("debpkg.py")]  # and this recipe


def _key(repo: Path) -> str:
    h = hashlib.sha256()
    h.update(" ".join((SUITE, *PACKAGES, *INITRAMFS_MODULES)).encode())
    for path in sorted([repo / "requirements-lock.txt", repo / "pyproject.toml", repo / "deploy/sshfwup.service",
                        *_device_sources(repo)]):  # fmt: skip
        h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _mmdebstrap(target: Path) -> None:
    modules = "\\n".join(INITRAMFS_MODULES)
    argv = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--quiet",
        f"--include={','.join(PACKAGES)}",
        # a device has no use for manuals, docs and translations; the slot is 256 MiB
        "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        # before the kernel's package runs update-initramfs
        f'--essential-hook=mkdir -p "$1/etc/initramfs-tools/conf.d" && '
        f'printf "{modules}\\n" > "$1/etc/initramfs-tools/sshfwup-modules"',
        '--customize-hook=cat "$1/etc/initramfs-tools/sshfwup-modules" >> "$1/etc/initramfs-tools/modules" && '
        'rm "$1/etc/initramfs-tools/sshfwup-modules" && chroot "$1" update-initramfs -u -k all',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
        SUITE, str(target), MIRROR,
    ]  # fmt: skip
    log.info("mmdebstrap %s (%d packages): about a minute", SUITE, len(PACKAGES))
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=MMDEBSTRAP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise VmError(f"mmdebstrap did not finish within {MMDEBSTRAP_TIMEOUT} s") from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise VmError(f"mmdebstrap failed (exit status {result.returncode}):\n{tail}")


def cached_rootfs(repo: Path, *, rebuild: bool = False) -> CachedRootfs:
    """The cached rootfs tar for this checkout, built when missing (or ``rebuild``)."""
    key = _key(repo)
    entry = CachedRootfs(CACHE_DIR / f"rootfs-{key}.tar", CACHE_DIR / f"rootfs-{key}.dpkg-l.txt",
                         CACHE_DIR / f"deb-{key}", key)  # fmt: skip
    if entry.tar.is_file() and entry.dpkg_list.is_file() and not rebuild:
        log.info("rootfs from the cache: %s", entry.tar)
        return entry
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a killed one's remains are stale
        if entry.tar.is_file() and entry.dpkg_list.is_file() and not rebuild:
            return entry  # another build made it while we waited
        _remove_stale_builds()
        _build(repo, entry)
    log.info("rootfs cached: %s", entry.tar)
    return entry


def _remove_stale_builds() -> None:
    """What a killed build left: its mounts (mmdebstrap's /proc, /sys, /dev in the chroot) first,
    lazily, deepest first — never rmtree through a mounted /proc — then the tree."""
    for stale in CACHE_DIR.glob("rootfs-build-*"):
        prefix = str(stale.resolve()) + "/"
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for point in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        log.warning("removing %s, left by a killed build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _build(repo: Path, entry: CachedRootfs) -> None:
    with tempfile.TemporaryDirectory(prefix="rootfs-build-", dir=CACHE_DIR) as tmp:
        target = Path(tmp) / "root"
        _mmdebstrap(target)
        build_and_install(target, Path(tmp), repo=repo, out=entry.deb)
        # Debian's .pyc are timestamp-checked: stale once the squashfs sets every mtime (debpkg.py)
        subprocess.run(["chroot", str(target), "/usr/bin/python3", "-m", "compileall", "-q", "-f",
                        "--invalidation-mode", "unchecked-hash", "/usr/lib/python3.11", "/usr/lib/python3/dist-packages"],
                       capture_output=True, check=False, timeout=600)  # fmt: skip
        listing = subprocess.run(["chroot", str(target), "dpkg", "-l"], capture_output=True, text=True, check=True)
        partial = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(target), "--numeric-owner", "--xattrs", "-cf", str(partial), "."],
                       check=True, timeout=600)  # fmt: skip
        entry.dpkg_list.write_text(listing.stdout)
        os.replace(partial, entry.tar)


def unpack(entry: CachedRootfs, dest: Path) -> None:
    """A fresh copy of the cached tree at ``dest`` (owners and modes kept: run as root)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(dest), "--numeric-owner", "--xattrs", "-xf", str(entry.tar)],
                   check=True, timeout=600)  # fmt: skip
