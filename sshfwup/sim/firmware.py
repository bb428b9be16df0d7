"""Build firmware for the simulated device: staging tree → squashfs → ``.fw``.

The staging tree is packed as it is (its manifest and HOT_RELOAD marker are written by the
caller beforehand). The squashfs is reproducible: fixed timestamps, every file owned by root,
so the same tree always gives the same bytes, and unchanged files hash the same across
versions. The ``.fw`` carries meta.conf compiled for :mod:`sshfwup.sim.layout` — the same
tasks as ``deploy/fwup.conf`` — so the real fwup and the stand-in both apply it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from sshfwup import fwfile
from sshfwup.fwfile import FirmwareError
from sshfwup.sim.layout import BLOCK_SIZE, DEFAULT_LAYOUT, Layout

log = logging.getLogger(__name__)

__all__ = ["SQUASHFS_TIME", "build_firmware", "build_squashfs"]

SQUASHFS_TIME = 1700000000  # every timestamp inside the image (2023-11-14T22:13:20Z)


def build_squashfs(staging: Path, out: Path) -> Path:
    """``mksquashfs staging out`` with fixed timestamps and root ownership (reproducible)."""
    staging, out = Path(staging), Path(out)
    if not staging.is_dir():
        raise FirmwareError(f"{staging}: staging tree not found (expected a directory)")
    mksquashfs = shutil.which("mksquashfs")
    if mksquashfs is None:
        raise FirmwareError("mksquashfs not found: install squashfs-tools (Debian: apt-get install squashfs-tools)")
    args = [
        mksquashfs, str(staging), str(out),
        "-noappend", "-all-root", "-quiet", "-no-progress",
        "-mkfs-time", str(SQUASHFS_TIME), "-all-time", str(SQUASHFS_TIME),
    ]  # fmt: skip
    # mksquashfs refuses SOURCE_DATE_EPOCH together with explicit times; the options win here
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        out.unlink(missing_ok=True)
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise FirmwareError(f"mksquashfs failed for {staging}: {detail[-1] if detail else f'exit {result.returncode}'}")
    return out


def _blake2b(path: Path) -> tuple[int, str]:
    hasher = hashlib.blake2b(digest_size=32)
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
            length += len(chunk)
    return length, hasher.hexdigest()


def build_firmware(
    staging: Path,
    out: Path,
    *,
    version: str,
    layout: Layout = DEFAULT_LAYOUT,
    platform: str | None = None,
    architecture: str | None = None,
    signing_key: Path | None = None,
    author: str = "sshfwup sim",
    description: str = "",
) -> Path:
    """Pack ``staging`` into a squashfs and that into a ``.fw`` for the sim layout.

    ``platform``/``architecture`` default to the layout's (a different platform makes a
    firmware that devices refuse). ``signing_key``: a ``fwup-key.priv`` file.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sshfwup-build-", dir=out.parent) as tmp:
        rootfs = build_squashfs(Path(staging), Path(tmp) / "rootfs.img")
        length, digest = _blake2b(rootfs)
        slot_bytes = layout.rootfs_count * BLOCK_SIZE
        if length > slot_bytes:
            raise FirmwareError(
                f"{staging}: the root filesystem is {length} bytes, larger than a slot "
                f"({slot_bytes} bytes); remove files or enlarge the layout's rootfs_count"
            )
        meta_conf = fwfile.compile_meta_conf(
            layout,
            version=version,
            rootfs_length=length,
            rootfs_blake2b=digest,
            author=author,
            description=description,
            platform=platform,
            architecture=architecture,
        )
        key = fwfile.load_private_key(signing_key) if signing_key is not None else None
        fwfile.write_firmware(out, meta_conf, {fwfile.ROOTFS_RESOURCE: rootfs}, signing_key=key)
    log.info("built %s: version %s, rootfs %d bytes%s", out, version, length, ", signed" if key else "")
    return out
