"""The host tools the QEMU device needs, found up front: one message names every missing package."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from sshfwup.vm.errors import ToolMissing

__all__ = ["BUILD_TOOLS", "RUN_TOOLS", "UBOOT_ROM", "require", "uboot_rom"]

# tool -> the Debian package that has it
BUILD_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkimage": "u-boot-tools",
    "mksquashfs": "squashfs-tools",
    "dpkg-deb": "dpkg",
    "fwup": "fwup (./scripts/bootstrap.sh builds it)",
    "chroot": "coreutils",
    "mkfs.ext4": "e2fsprogs",
}
RUN_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
}
# Debian's u-boot-qemu: the 32-bit qemu-x86 build boots a 64-bit kernel (the x86_64 build resets)
UBOOT_ROM = Path("/usr/lib/u-boot/qemu-x86/u-boot.rom")


def require(tools: dict[str, str], *, what: str, extra: Iterable[tuple[Path, str]] = ()) -> dict[str, str]:
    """The path of every tool in ``tools``; ToolMissing naming all missing packages at once."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name, package in tools.items():
        path = shutil.which(name)
        if path is None:
            missing.append(package)
        else:
            found[name] = path
    missing += [package for path, package in extra if not path.exists()]
    if missing:
        packages = " ".join(dict.fromkeys(p.split(" ")[0] for p in missing))
        raise ToolMissing(
            f"{what} needs {', '.join(dict.fromkeys(missing))}: install them "
            f"(Debian: apt-get install {packages}; ./scripts/bootstrap.sh installs all of them)"
        )
    return found


def uboot_rom() -> Path:
    require({}, what="booting the VM", extra=[(UBOOT_ROM, "u-boot-qemu")])
    return UBOOT_ROM
