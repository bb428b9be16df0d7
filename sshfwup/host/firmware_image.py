"""What a ``.fw``'s root filesystem tells the device, read on the build machine.

The device mounts the new slot and reads two files from it — the manifest and the HOT_RELOAD
marker — and hashes the app directories against the manifest (``inspect.inspect_slot``). The
host has the same bytes inside the ``.fw``: the root filesystem resource (a squashfs image).
This module gets the same three answers out of that image without mounting it:

- the image is streamed out of the archive into a temporary file (its blake2b-256 is checked
  on the way, as fwup does);
- paths are looked up and symlinks followed *inside the image* with ``unsquashfs -lln`` (the
  same walk as ``manifest.resolve_in_root``), and the two files are read with ``unsquashfs -cat``;
- for the app check, only the app directories are extracted (``unsquashfs -d``), then
  ``inspect.check_app_files`` runs on them exactly as on the device.

Every problem with a manifest or marker is reported in the device's words (``ManifestError``
from the same functions), so ``decide`` reaches the device's verdict. Problems with the image
itself (no root filesystem, not squashfs, no ``unsquashfs``) are ``RootfsError``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.archive import FirmwareInfo, extract_resource
from sshfwup.firmware.inspect import (
    AppCheck,
    ManifestState,
    MarkerState,
    Policy,
    check_app_files,
    read_states,
)
from sshfwup.firmware.manifest import MANIFEST_PATH, MARKER_PATH, Manifest, ManifestError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ROOTFS_RESOURCE",
    "RootfsError",
    "RootfsView",
    "SquashfsImage",
    "SquashfsNode",
    "choose_rootfs_resource",
    "open_rootfs",
    "read_rootfs_view",
]

DEFAULT_ROOTFS_RESOURCE = "rootfs.img"
SQUASHFS_MAGIC = b"hsqs"  # little-endian squashfs superblock
_MAX_SYMLINKS = 40  # as manifest.resolve_in_root
_TIMEOUT = 600.0  # seconds for one unsquashfs run (a large image on a slow disk)
# "-rw-r--r-- 0/0   1234 2023-11-14 22:13 /path" (devices show "major, minor" as the size)
_LISTING = re.compile(
    r"^(?P<type>[-dlcbps])[-rwxsStT]{9}\s+\S+\s+(?P<size>\d+|\d+,\s*\d+)\s+"
    r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}(?: (?P<rest>.*))?$"
)
_KINDS = {"-": "file", "d": "dir", "l": "symlink"}


class RootfsError(Exception):
    """The firmware's root filesystem cannot be read on this machine (missing, not squashfs, no tool)."""


@dataclass(frozen=True)
class SquashfsNode:
    path: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int = 0
    target: str | None = None  # symlinks only


@dataclass(frozen=True)
class RootfsView:
    """What the device would read from this firmware's root filesystem."""

    resource: str
    manifest: ManifestState  # None: missing; ManifestError: unusable (in the device's words)
    marker: MarkerState
    app: AppCheck | None = None  # None: not checked (no usable manifest, or not asked)

    @property
    def app_mismatches(self) -> tuple[str, ...] | None:
        return None if self.app is None else self.app.mismatches


class SquashfsImage:
    """Read-only access to paths inside a squashfs image through ``unsquashfs``."""

    def __init__(self, image: Path, *, unsquashfs: str | None = None) -> None:
        self.image = Path(image)
        tool = unsquashfs or shutil.which("unsquashfs")
        if tool is None:
            raise RootfsError("unsquashfs not found: install squashfs-tools (Debian: apt-get install squashfs-tools)")
        self.tool = tool
        try:
            with self.image.open("rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise RootfsError(f"cannot read the root filesystem image {self.image}: {e.strerror}") from None
        if magic != SQUASHFS_MAGIC:
            raise RootfsError(
                f"the root filesystem is not a squashfs image (it starts with {magic!r}); "
                "only squashfs root filesystems can be read on the build machine"
            )
        self._nodes: dict[str, SquashfsNode | None] = {"/": SquashfsNode("/", "dir")}

    # --- unsquashfs ----------------------------------------------------------------------

    def _run(self, args: Sequence[str], *, what: str) -> bytes:
        env = dict(os.environ, LC_ALL="C", TZ="UTC")
        try:
            result = subprocess.run(
                [self.tool, *args], capture_output=True, env=env, timeout=_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired:
            raise RootfsError(f"unsquashfs took longer than {_TIMEOUT:.0f} s to {what}") from None
        except OSError as e:
            raise RootfsError(f"cannot run {self.tool}: {e.strerror}") from None
        if result.returncode != 0:
            detail = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RootfsError(
                f"unsquashfs could not {what} in {self.image}: {detail[-1] if detail else f'exit {result.returncode}'}"
            )
        return result.stdout

    def _list(self, path: str) -> None:
        """List ``path`` and its ancestors; cache what the listing proves.

        ``unsquashfs -lln`` prints the directories on the way and the final path itself. It
        stops silently at a symlink or a file in the middle, so only the final path's absence
        is proven by its absence from the listing.
        """
        parts = [p for p in path.split("/") if p]
        expected = ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]
        out = self._run(
            ["-lln", "-UTC", "-no-wildcards", "-d", "", "-max-depth", str(len(parts)), str(self.image), path],
            what=f"list {path}",
        )
        for raw in out.splitlines():
            m = _LISTING.match(raw.decode("utf-8", "surrogateescape"))
            if m is None or not m.group("rest"):
                continue
            rest = m.group("rest")
            kind = _KINDS.get(m.group("type"), "other")
            if kind == "symlink":
                for name in expected:
                    if rest.startswith(name + " -> "):
                        self._nodes[name] = SquashfsNode(name, "symlink", 0, rest[len(name) + 4 :])
                        break
            elif rest in expected:
                size = int(m.group("size")) if kind == "file" else 0
                self._nodes[rest] = SquashfsNode(rest, kind, size)  # type: ignore[arg-type]
        self._nodes.setdefault(expected[-1], None)

    def lookup(self, path: str) -> SquashfsNode | None:
        """The node at ``path`` (absolute, normalized, no symlink followed); None if absent."""
        path = "/" + posixpath.normpath(path).lstrip("/")
        if path not in self._nodes:
            self._list(path)
        return self._nodes[path]

    # --- the device's walk -----------------------------------------------------------------

    def resolve(self, path: str) -> str | None:
        """``path`` with every symlink followed inside the image; None when it leads nowhere.

        The same walk as ``manifest.resolve_in_root`` on the mounted slot.
        """
        if ".." not in path.split("/") and path.strip("/"):
            self.lookup(path)  # one listing caches every directory on the way
        parts = deque(p for p in path.split("/") if p not in ("", "."))
        resolved: list[str] = []
        links = 0
        while parts:
            part = parts.popleft()
            if part == "..":
                if resolved:
                    resolved.pop()
                continue
            node = self.lookup("/" + "/".join([*resolved, part]))
            if node is None:
                return None
            if node.kind == "symlink" and node.target is not None:
                links += 1
                if links > _MAX_SYMLINKS:
                    raise ManifestError(f"{path}: too many levels of symbolic links")
                if node.target.startswith("/"):
                    resolved = []
                parts.extendleft(reversed([p for p in node.target.split("/") if p not in ("", ".")]))
                continue
            resolved.append(part)
        return "/" + "/".join(resolved)

    def read_file(self, path: str, *, limit: int, what: str) -> bytes | None:
        """The bytes of ``path``; None when it does not exist. Mirrors ``manifest.read_rootfs_file``."""
        resolved = self.resolve(path)
        node = None if resolved is None else self.lookup(resolved)
        if resolved is None or node is None:
            return None
        if node.kind == "dir":
            raise ManifestError(f"{what} {path} is a directory, not a file")
        if node.kind != "file":
            raise ManifestError(f"{what} {path} is not a regular file")
        if node.size > limit:
            raise ManifestError(f"{what} {path} is larger than {limit} bytes")
        try:
            data = self._run(["-cat", "-no-wildcards", str(self.image), resolved], what=f"read {resolved}")
        except RootfsError as e:
            raise ManifestError(f"cannot read {what} {path}: {e}") from None
        if len(data) > limit:
            raise ManifestError(f"{what} {path} is larger than {limit} bytes")
        return data

    def extract(self, paths: Sequence[str], dest: Path) -> Path:
        """Extract ``paths`` (and everything below them) into the new directory ``dest``.

        Symlinks are extracted as symlinks, never followed; paths that do not exist (or lie
        beyond a symlink) are skipped, as a scan of the mounted slot would skip them.
        """
        self._run(
            ["-no-progress", "-quiet", "-no-xattrs", "-no-wildcards", "-d", str(dest), str(self.image), *paths],
            what="extract " + ", ".join(paths),
        )
        dest.mkdir(exist_ok=True)  # nothing matched: unsquashfs creates no directory at all
        return dest


# --- the firmware side -----------------------------------------------------------------------


def choose_rootfs_resource(info: FirmwareInfo, name: str | None = None) -> str:
    """The resource holding the root filesystem: ``name``, else ``rootfs.img``, else the only
    resource whose name says rootfs."""
    resources = list(info.meta.resources)
    if name is not None:
        if name not in resources:
            raise RootfsError(f"{info.source} has no resource {name!r} (it has: {', '.join(resources) or 'none'})")
        return name
    if DEFAULT_ROOTFS_RESOURCE in resources:
        return DEFAULT_ROOTFS_RESOURCE
    candidates = [r for r in resources if "rootfs" in r.lower()]
    if len(candidates) == 1:
        return candidates[0]
    raise RootfsError(
        f"{info.source}: cannot tell which resource is the root filesystem "
        f"(resources: {', '.join(resources) or 'none'}); name it with --rootfs-resource"
    )


@contextmanager
def open_rootfs(fw: Path, info: FirmwareInfo, resource: str | None = None) -> Iterator[SquashfsImage]:
    """The firmware's root filesystem image in a temporary file, removed on exit."""
    name = choose_rootfs_resource(info, resource)
    with tempfile.TemporaryDirectory(prefix="sshfwup-rootfs-") as tmp:
        image = Path(tmp) / "rootfs.img"
        try:
            extract_resource(fw, name, image)
        except FirmwareError as e:
            raise RootfsError(f"cannot read the root filesystem {name} of {fw}: {e}") from None
        yield SquashfsImage(image)


def _check_app(image: SquashfsImage, manifest: Manifest, policy: Policy, exclude: Sequence[str]) -> AppCheck:
    with tempfile.TemporaryDirectory(prefix="sshfwup-app-") as tmp:
        tree = image.extract(list(policy.app_dirs), Path(tmp) / "root")
        return check_app_files(tree, manifest, policy, exclude=exclude)


def read_rootfs_view(
    fw: Path,
    info: FirmwareInfo,
    *,
    resource: str | None = None,
    manifest_path: str = MANIFEST_PATH,
    marker_path: str = MARKER_PATH,
    policy: Policy | None = None,
    verify_app_dirs: Sequence[str] | Callable[[Manifest], Sequence[str]] | None = None,
    running: ManifestState = None,
) -> RootfsView:
    """Manifest and marker of ``fw``'s root filesystem, read as the device reads them.

    ``policy``: the device's (paths, bounds, interpreter patterns; default: one with
    ``manifest_path``/``marker_path``). ``verify_app_dirs``: also check the app files against
    the manifest as the device does before a hot swap (``inspect.check_app_files``) under these
    directories — or under the directories a callable picks once the manifest is known — with
    the exclusions of the device's policy and of the ``running`` firmware's manifest. Skipped
    when the manifest is not usable.
    """
    policy = policy or Policy(manifest_path=manifest_path, marker_path=marker_path)
    name = choose_rootfs_resource(info, resource)
    with open_rootfs(fw, info, name) as image:
        manifest, marker = read_states(
            image.read_file, manifest_path=policy.manifest_path, marker_path=policy.marker_path,
            max_size=policy.max_manifest_size, max_entries=policy.max_manifest_entries,
        )  # fmt: skip
        app = None
        if verify_app_dirs is not None and isinstance(manifest, Manifest):
            dirs = verify_app_dirs(manifest) if callable(verify_app_dirs) else verify_app_dirs
            checked = replace(policy, app_dirs=tuple(dirs))
            app = _check_app(image, manifest, checked, checked.excluded(running))
    log.debug("%s: manifest %s, marker %s", fw, type(manifest).__name__, marker)
    return RootfsView(name, manifest, marker, app)
