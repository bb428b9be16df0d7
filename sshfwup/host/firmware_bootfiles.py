"""Find the kernel and device trees in a staging root filesystem, for ``sshfwup firmware build``.

The device proves a hot swap safe only when both the running and the new firmware record their
kernel and device trees in the manifest (:func:`sshfwup.firmware.inspect` reasons "kernel
changed (not recorded in the new firmware)"). A build that is not told where they are looks in
the usual places of the tree:

- the kernel: ``/boot/vmlinuz*``, ``/boot/vmlinux*``, ``/boot/Image*``, ``/boot/zImage*``,
  ``/boot/bzImage*``, ``/boot/uImage*`` (regular files; symlinks such as Debian's
  ``/vmlinuz`` point at one of these). With several, the one whose version has a
  ``/lib/modules/<version>`` directory, if that picks exactly one;
- device trees: ``/boot/*.dtb``, and ``*.dtb``/``*.dtbo`` under ``/boot/dtbs``, ``/boot/dtb``,
  ``/boot/dtb-*``, ``/usr/lib/linux-image-*``.

Symlinks are never followed: the tree is the device's root filesystem, not this machine's.
Host-side only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KERNEL_PREFIXES", "BootFiles", "find_boot_files"]

KERNEL_PREFIXES = ("vmlinuz", "vmlinux", "Image", "zImage", "bzImage", "uImage")
_DTB_DIRS = ("/boot/dtbs", "/boot/dtb")
_DTB_DIR_GLOBS = (("/boot", "dtb-"), ("/usr/lib", "linux-image-"))  # (parent, name prefix)
_DTB_SUFFIXES = (".dtb", ".dtbo")
_MODULE_DIRS = ("/lib/modules", "/usr/lib/modules")


@dataclass(frozen=True)
class BootFiles:
    """What :func:`find_boot_files` found (rootfs paths)."""

    kernel: str | None
    dtbs: tuple[str, ...]
    kernels: tuple[str, ...]  # every kernel candidate (more than one and no pick: ``kernel`` is None)
    module_versions: tuple[str, ...]  # the /lib/modules/<version> directories

    @property
    def ambiguous(self) -> bool:
        return self.kernel is None and len(self.kernels) > 1


def _real_dir(root: Path, path: str) -> Path | None:
    """``root/path`` if it is a directory reached through no symlink, else None."""
    here = root
    for part in path.strip("/").split("/"):
        here = here / part
        try:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                return None
        except OSError:
            return None
    return here


def _children(directory: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _rootfs_path(root: Path, host: str) -> str:
    return "/" + Path(host).relative_to(root).as_posix()


def _dtbs_under(root: Path, directory: Path) -> Iterator[str]:
    for top, dirs, files in os.walk(directory, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(top, name)
            if name.endswith(_DTB_SUFFIXES) and os.path.isfile(full) and not os.path.islink(full):
                yield _rootfs_path(root, full)


def _kernel_version(name: str) -> str | None:
    """``vmlinuz-6.1.0-18-amd64`` → ``6.1.0-18-amd64``; None without a version."""
    _, sep, version = name.partition("-")
    return version if sep and version else None


def find_boot_files(root: Path) -> BootFiles:
    """The kernel and device trees in the usual places of the staging tree ``root``."""
    root = Path(os.path.abspath(root))
    boot = _real_dir(root, "/boot")
    kernels: list[str] = []
    dtbs: list[str] = []
    if boot is not None:
        for entry in _children(boot):
            if not entry.is_file(follow_symlinks=False):
                continue
            if entry.name.startswith(KERNEL_PREFIXES) and not entry.name.endswith((".old", ".bak", ".sig")):
                kernels.append(f"/boot/{entry.name}")
            elif entry.name.endswith(_DTB_SUFFIXES):
                dtbs.append(f"/boot/{entry.name}")
    for path in _DTB_DIRS:
        directory = _real_dir(root, path)
        if directory is not None:
            dtbs.extend(_dtbs_under(root, directory))
    for parent, prefix in _DTB_DIR_GLOBS:
        directory = _real_dir(root, parent)
        for entry in _children(directory) if directory is not None else ():
            if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                dtbs.extend(_dtbs_under(root, Path(entry.path)))
    versions: list[str] = []
    for path in _MODULE_DIRS:
        directory = _real_dir(root, path)
        for entry in _children(directory) if directory is not None else ():
            if entry.is_dir(follow_symlinks=False) and entry.name not in versions:
                versions.append(entry.name)
    kernel = None
    if len(kernels) == 1:
        kernel = kernels[0]
    elif kernels:
        matching = [k for k in kernels if _kernel_version(Path(k).name) in versions]
        kernel = matching[0] if len(matching) == 1 else None
    return BootFiles(kernel, tuple(dict.fromkeys(dtbs)), tuple(kernels), tuple(versions))
