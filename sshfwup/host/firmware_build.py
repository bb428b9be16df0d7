"""Build a ``.fw`` from a staging root filesystem: manifest + marker → reproducible squashfs → ``fwup -c``.

``sshfwup firmware build``, the simulator, the demo, the benchmarks and the tests all build
firmware through :func:`build_firmware`, with the real ``fwup -c -f deploy/fwup.conf`` (or a
conf of the user's): the conf we ship is the conf everything applies.

The squashfs is reproducible — the same tree gives the same bytes — and laid out for small
deltas (``sshfwup firmware delta``):

- every timestamp is :data:`SQUASHFS_TIME` and every file is owned by root (``-all-time``,
  ``-mkfs-time``, ``-all-root``); mksquashfs sorts directory entries itself and packs
  reproducibly (its default since 4.5), and ``SOURCE_DATE_EPOCH`` makes fwup's zip the same.
- the data of the directories that change most often goes last (the app directories, then
  :data:`DATA_LAST`; ``mksquashfs -sort``). A file that changes size moves the data of every
  file stored after it, and each moved file's inode records the new position; with the app's
  data at the end, an app change moves nothing else.
- the inode and directory tables are not compressed (``-noI``): compressed, one changed inode
  changes the size of its 8 KiB metadata block, which moves every later block and so changes
  every directory entry that points past it. Measured on a 38 MiB root filesystem of Debian's
  Python and Perl files: a one-line app change made a 150 KB patch by default, 50 KB with the
  sort, 3 KB with the sort and ``-noI``; the image grows by 0.65 %.

Host-side only: ``sshfwup serve`` never imports this module.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.manifest import (
    DEFAULT_APP_DIRS,
    MANIFEST_PATH,
    MARKER_PATH,
    Manifest,
    ManifestError,
    build_manifest,
    read_marker,
    resolve_in_root,
    write_manifest,
    write_marker,
)

log = logging.getLogger(__name__)

__all__ = [
    "DATA_LAST",
    "SQUASHFS_TIME",
    "BuildError",
    "Built",
    "build_firmware",
    "build_release",
    "build_squashfs",
    "find_fwup",
    "prepare_rootfs",
    "reference_conf",
]

SQUASHFS_TIME = 1700000000  # every timestamp inside the image (2023-11-14T22:13:20Z)
DATA_LAST = ("/etc",)  # after the app directories: what changes most often, stored last


class BuildError(FirmwareError):
    """A firmware build was refused or failed; the message says why and what to do."""


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BuildError(f"{name} not found: install {package} (Debian: apt-get install {package})")
    return found


def find_fwup(fwup: str | None = None) -> str:
    """The fwup executable: ``fwup`` if given, else the one on PATH; a clear error without one."""
    found = shutil.which(fwup or "fwup")
    if found is None:
        raise BuildError(
            f"{fwup or 'fwup'} not found: install fwup >= 1.16 (./scripts/bootstrap.sh builds it from "
            "the source tarball named by FWUP_SOURCE; Debian has no package)"
        )
    return found


def reference_conf() -> Path:
    """``deploy/fwup.conf``, the fwup configuration sshfwup ships (``sim/fwup.conf`` links to it)."""
    return (Path(__file__).parents[1] / "sim" / "fwup.conf").resolve()


def _conf(conf: Path | None, signing_key: Path | None) -> Path:
    """The fwup.conf to build with (absolute); the signing key must exist too."""
    conf = Path(conf).absolute() if conf is not None else reference_conf()
    if not conf.is_file():
        raise BuildError(f"{conf}: fwup configuration not found")
    if signing_key is not None and not Path(signing_key).is_file():
        raise BuildError(f"{signing_key}: signing key not found (an fwup-key.priv from `sshfwup keys gen --firmware`)")
    return conf


def _sort_file(staging: Path, last: Sequence[str], out: Path) -> Path | None:
    """mksquashfs's sort file: the directories of ``last`` get the lowest priorities, in order
    (the first one is stored very last). Priorities lower than the default 0 go after everything."""
    lines = []
    for i, path in enumerate(dict.fromkeys(last)):
        relative = path.strip("/")
        if any(c.isspace() for c in relative):  # the sort file is "NAME PRIORITY" per line
            log.warning("%s: not stored last in the squashfs (a path with white space)", path)
        elif relative and resolve_in_root(staging, path).exists():
            lines.append(f"{relative} {-32768 + i}\n")
    if not lines:
        return None
    out.write_text("".join(lines))
    return out


def build_squashfs(staging: Path, out: Path, *, last: Sequence[str] = (*DEFAULT_APP_DIRS, *DATA_LAST)) -> Path:
    """``mksquashfs staging out``, reproducible; the data under ``last`` (paths inside the tree,
    the first one very last) is stored after everything else."""
    staging, out = Path(staging), Path(out)
    if not staging.is_dir():
        raise BuildError(f"{staging}: staging tree not found (expected a directory)")
    mksquashfs = _tool("mksquashfs", "squashfs-tools")
    args = [
        mksquashfs, str(staging), str(out),
        "-noappend", "-all-root", "-quiet", "-no-progress", "-noI",
        "-mkfs-time", str(SQUASHFS_TIME), "-all-time", str(SQUASHFS_TIME),
    ]  # fmt: skip
    # mksquashfs refuses SOURCE_DATE_EPOCH together with explicit times; the options win here
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    with tempfile.TemporaryDirectory(prefix=".sshfwup-sort-", dir=out.parent) as tmp:
        sort = _sort_file(staging, last, Path(tmp) / "sort")
        if sort is not None:
            args += ["-sort", str(sort)]
        result = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        out.unlink(missing_ok=True)
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise BuildError(f"mksquashfs failed for {staging}: {detail[-1] if detail else f'exit {result.returncode}'}")
    return out


def build_firmware(
    staging: Path,
    out: Path,
    *,
    version: str | None,
    platform: str | None = None,
    architecture: str | None = None,
    signing_key: Path | None = None,
    author: str | None = None,
    description: str | None = None,
    conf: Path | None = None,
    variables: Mapping[str, str] | None = None,
    fwup: str | None = None,
    app_dirs: Sequence[str] = DEFAULT_APP_DIRS,
) -> Path:
    """Pack ``staging`` as it is into a reproducible squashfs and that into a ``.fw`` with the
    real ``fwup -c -f deploy/fwup.conf`` (or ``conf``).

    ``version`` (None: the conf's default), ``platform``/``architecture``/``author``/
    ``description`` override the conf's defaults (a different platform makes a firmware that
    devices refuse); ``variables`` are further environment variables for the conf (fwup's
    ``define()`` keeps a value the environment sets). ``signing_key``: a ``fwup-key.priv`` file
    (``fwup -c -s``). ``app_dirs``: stored last in the squashfs. ``SOURCE_DATE_EPOCH`` is fixed,
    so the same tree and version give the same bytes.
    """
    out = Path(out).absolute()
    staging = Path(staging).absolute()  # fwup resolves a relative host-path against the conf's folder
    fwup_path = find_fwup(fwup)
    conf = _conf(conf, signing_key)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(variables or {}), "SOURCE_DATE_EPOCH": str(SQUASHFS_TIME)}
    for name, value in (("VERSION", version), ("PLATFORM", platform), ("ARCHITECTURE", architecture),
                        ("AUTHOR", author), ("DESCRIPTION", description)):  # fmt: skip
        if value is not None:
            env[f"NERVES_FW_{name}"] = value
    with tempfile.TemporaryDirectory(prefix=".sshfwup-build-", dir=out.parent) as tmp:
        rootfs = build_squashfs(staging, Path(tmp) / "rootfs.img", last=(*app_dirs, *DATA_LAST))
        env["ROOTFS"] = str(rootfs)
        partial = Path(tmp) / out.name
        argv = [fwup_path, "-c", "-f", str(conf), "-o", str(partial)]
        if signing_key is not None:
            argv += ["-s", str(signing_key)]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            detail = (result.stdout + result.stderr).strip()
            raise BuildError(f"fwup -c failed for {staging}: {detail or f'exit status {result.returncode}'}")
        os.replace(partial, out)
    # debug: every caller with an operator says what it built itself, at its final path
    log.debug("built %s: version %s%s", out, version or "(the conf's default)", ", signed" if signing_key else "")
    return out


# --- a release from a staging tree (``sshfwup firmware build``) ----------------------------------


def prepare_rootfs(
    root: Path,
    *,
    app_dirs: Sequence[str] = DEFAULT_APP_DIRS,
    kernel: str | Path | None = None,
    dtbs: Sequence[str | Path] = (),
    hot: bool | None = None,
    manifest_path: str = MANIFEST_PATH,
    marker_path: str = MARKER_PATH,
) -> Manifest:
    """Write the HOT_RELOAD marker (``hot`` True/False; None leaves it as it is) and then the
    manifest into the staging tree ``root`` — what the device's hot-or-reboot decision reads."""
    if hot is not None:  # first: the manifest leaves the marker out, whatever it says
        write_marker(root, hot, path=marker_path)
    # and the manifest's folder: made by the first write, it would be in the second build's manifest only
    resolve_in_root(root, manifest_path).parent.mkdir(parents=True, exist_ok=True)
    try:
        manifest = build_manifest(
            root, app_dirs=app_dirs, kernel=kernel, dtbs=dtbs, exclude=(manifest_path, marker_path)
        )
        write_manifest(root, manifest, path=manifest_path)
    except ManifestError as e:
        raise BuildError(str(e)) from None
    return manifest


@dataclass(frozen=True)
class Built:
    """What ``sshfwup firmware build`` made."""

    path: Path
    size: int
    uuid: str
    version: str
    manifest: Manifest
    hot: bool | None  # the HOT_RELOAD marker in the image (None: none)
    signed: bool


def build_release(
    root: Path,
    out: Path,
    *,
    version: str | None = None,
    app_dirs: Sequence[str] = DEFAULT_APP_DIRS,
    kernel: str | Path | None = None,
    dtbs: Sequence[str | Path] = (),
    hot: bool | None = None,
    signing_key: Path | None = None,
    conf: Path | None = None,
    platform: str | None = None,
    architecture: str | None = None,
    variables: Mapping[str, str] | None = None,
    manifest_path: str = MANIFEST_PATH,
    marker_path: str = MARKER_PATH,
    fwup: str | None = None,
) -> Built:
    """Everything ``sshfwup firmware build`` does: check the inputs (before anything is written),
    write manifest and marker into ``root``, pack it, and read back what was built."""
    from sshfwup.firmware.archive import read_firmware

    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"{root}: not a directory (expected the staging root filesystem)")
    # refuse before writing into the tree or running mksquashfs (which takes a while)
    find_fwup(fwup)
    _tool("mksquashfs", "squashfs-tools")
    _conf(conf, signing_key)
    missing = [d for d in app_dirs if not resolve_in_root(root, d).is_dir()]
    if missing:
        raise BuildError(
            f"app directory {missing[0]} is not in {root}: the device runs the app from there "
            "(pass --app-dir with the directory the app lives in)"
        )
    manifest = prepare_rootfs(root, app_dirs=app_dirs, kernel=kernel, dtbs=dtbs, hot=hot,
                              manifest_path=manifest_path, marker_path=marker_path)  # fmt: skip
    try:
        marker = read_marker(resolve_in_root(root, marker_path), name=marker_path)
    except ManifestError as e:
        raise BuildError(str(e)) from None
    path = build_firmware(root, out, version=version, platform=platform, architecture=architecture,
                          signing_key=signing_key, conf=conf, variables=variables, fwup=fwup,
                          app_dirs=app_dirs)  # fmt: skip
    info = read_firmware(path)
    return Built(path, path.stat().st_size, info.uuid, info.version, manifest, marker, info.signature is not None)
