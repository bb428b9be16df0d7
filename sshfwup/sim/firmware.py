"""Build firmware for the simulated device: staging tree → squashfs → ``.fw``.

The staging tree is packed as it is (its manifest and HOT_RELOAD marker are written by the
caller beforehand). The squashfs is reproducible: fixed timestamps, every file owned by root,
so the same tree always gives the same bytes, and unchanged files hash the same across
versions. The ``.fw`` is made by the real ``fwup -c`` from ``deploy/fwup.conf`` — the conf we
ship is the conf the simulator, the demo and the tests apply.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from sshfwup.fwfile import FirmwareError

log = logging.getLogger(__name__)

__all__ = ["SQUASHFS_TIME", "build_firmware", "build_squashfs", "find_fwup", "reference_conf"]

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


def reference_conf() -> Path:
    """``deploy/fwup.conf``, the fwup configuration sshfwup ships (``sim/fwup.conf`` links to it)."""
    return Path(__file__).with_name("fwup.conf").resolve()


def find_fwup(fwup: str | None = None) -> str:
    """The fwup executable: ``fwup`` if given, else the one on PATH; a clear error without one."""
    found = shutil.which(fwup or "fwup")
    if found is None:
        raise FirmwareError(
            f"{fwup or 'fwup'} not found: install fwup >= 1.16 (./scripts/bootstrap.sh builds it from "
            "the source tarball named by FWUP_SOURCE)"
        )
    return found


def build_firmware(
    staging: Path,
    out: Path,
    *,
    version: str,
    platform: str | None = None,
    architecture: str | None = None,
    signing_key: Path | None = None,
    author: str | None = None,
    description: str | None = None,
    conf: Path | None = None,
    variables: Mapping[str, str] | None = None,
    fwup: str | None = None,
) -> Path:
    """Pack ``staging`` into a reproducible squashfs and that into a ``.fw`` with the real
    ``fwup -c -f deploy/fwup.conf`` (or ``conf``).

    ``platform``/``architecture``/``author``/``description`` override the conf's defaults
    (a different platform makes a firmware that devices refuse); ``variables`` are further
    environment variables for the conf (fwup's ``define()`` keeps a value the environment
    sets). ``signing_key``: a ``fwup-key.priv`` file (``fwup -c -s``). ``SOURCE_DATE_EPOCH``
    is fixed, so the same tree and version give the same bytes.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fwup_path = find_fwup(fwup)
    conf = Path(conf) if conf is not None else reference_conf()
    env = {**os.environ, **(variables or {}), "SOURCE_DATE_EPOCH": str(SQUASHFS_TIME), "NERVES_FW_VERSION": version}
    for name, value in (("PLATFORM", platform), ("ARCHITECTURE", architecture), ("AUTHOR", author),
                        ("DESCRIPTION", description)):  # fmt: skip
        if value is not None:
            env[f"NERVES_FW_{name}"] = value
    with tempfile.TemporaryDirectory(prefix=".sshfwup-build-", dir=out.parent) as tmp:
        rootfs = build_squashfs(Path(staging), Path(tmp) / "rootfs.img")
        env["ROOTFS"] = str(rootfs)
        partial = Path(tmp) / out.name
        argv = [fwup_path, "-c", "-f", str(conf), "-o", str(partial)]
        if signing_key is not None:
            argv += ["-s", str(signing_key)]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            detail = (result.stdout + result.stderr).strip()
            raise FirmwareError(f"fwup -c failed for {staging}: {detail or f'exit status {result.returncode}'}")
        os.replace(partial, out)
    log.info("built %s: version %s%s", out, version, ", signed" if signing_key else "")
    return out
