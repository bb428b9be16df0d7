"""Building a manifest: walk a root filesystem tree (symlinks not followed), hash and classify
every path, and record the kernel and device trees.

The firmware build writes the manifest and the HOT_RELOAD marker into the root filesystem it is
about to pack. Build order: ``write_marker`` → ``build_manifest`` → ``write_manifest``. The marker
and the manifest exclude themselves (they change every build); the excluded paths are recorded in
the manifest so every reader skips the same ones.

``scan_tree`` is also how the device describes what an upload brought (bounded by a ``Deadline``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sshfwup import __version__

from .manifest_model import DEFAULT_APP_DIRS, MANIFEST_PATH, MARKER_PATH, Entry, Manifest, ManifestError
from .native_code import is_native
from .rootfs_paths import host_path, inside, normalize

log = logging.getLogger(__name__)

__all__ = ["Classifier", "Deadline", "build_manifest", "scan_tree"]

_CHUNK = 1024 * 1024
_HEAD = 256  # bytes kept of each file: ELF magic, and the #! line as the kernel reads it (BINPRM_BUF_SIZE)


Classifier = Callable[[str, int, bytes], bool]  # (path, mode, first bytes) -> native?


class Deadline:
    """A time limit on reading what an upload brought (``[inspect] hash_timeout``)."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self._end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self._end:
            raise ManifestError(f"{self.what} took longer than {self.seconds:g} s")


def _hash_file(host: Path, deadline: Deadline | None = None) -> tuple[str, int, bytes]:
    """(sha256 hex, size, first bytes) read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    head = b""
    with open(host, "rb") as f:
        while chunk := f.read(_CHUNK):
            if not size:
                head = chunk[:_HEAD]
            digest.update(chunk)
            size += len(chunk)
            if deadline is not None:
                deadline.check()
    return digest.hexdigest(), size, head


def _entry(
    host: Path, path: str, st: os.stat_result, classify: Classifier | None = None, deadline: Deadline | None = None
) -> Entry:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        try:
            sha, size, head = _hash_file(host, deadline)
        except OSError as e:
            raise ManifestError(f"cannot read {path}: {e.strerror}") from None
        native = classify(path, mode, head) if classify is not None else is_native(path, mode, head)
        return Entry(path, "file", mode, size, sha, None, native)
    if stat.S_ISDIR(st.st_mode):
        return Entry(path, "dir", mode)
    if stat.S_ISLNK(st.st_mode):
        return Entry(path, "symlink", mode, target=os.readlink(host))
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node = "char" if stat.S_ISCHR(st.st_mode) else "block"
        return Entry(path, "other", mode, target=f"{node} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    return Entry(path, "other", mode, target="fifo" if stat.S_ISFIFO(st.st_mode) else "socket")


def _lstat_dir_chain(root: Path, path: str) -> os.stat_result | None:
    """lstat of ``path`` in ``root`` when every ancestor is a real directory (no symlink)."""
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts)):
        try:
            st = os.lstat(root.joinpath(*parts[: i + 1]))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            return None
    return st if parts else os.lstat(root)


def scan_tree(
    root: Path,
    starts: Sequence[str] = ("/",),
    *,
    exclude: Sequence[str] = (),
    classify: Classifier | None = None,
    deadline: Deadline | None = None,
) -> dict[str, Entry]:
    """Entries for ``starts`` and everything below them, without following any symlink.

    ``/`` itself is not an entry. Paths inside ``exclude`` are skipped. Sorted by path.
    ``classify`` decides ``Entry.native`` (default: the build's rule, :func:`is_native`);
    ``deadline`` bounds the time spent (ManifestError when it passes).
    """
    entries: dict[str, Entry] = {}
    stack: list[str] = []
    for start in starts:
        start = normalize(start, "scan start")
        if inside(start, exclude):
            continue
        if start == "/":
            stack.append("/")
            continue
        st = _lstat_dir_chain(root, start)
        if st is None:
            continue
        entries[start] = _entry(host_path(root, start), start, st, classify, deadline)
        if stat.S_ISDIR(st.st_mode):
            stack.append(start)
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(host_path(root, directory)) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            raise ManifestError(f"cannot list {directory}: {e.strerror}") from None
        for name in names:
            path = posixpath.join(directory, name)
            if inside(path, exclude):
                continue
            host = host_path(root, path)
            entry = _entry(host, path, os.lstat(host), classify, deadline)
            entries[path] = entry
            if deadline is not None:
                deadline.check()
            if entry.kind == "dir":
                stack.append(path)
    return dict(sorted(entries.items()))


def _boot_file(
    root: Path, given: str | Path, virtual: str, entries: dict[str, Entry], what: str
) -> str:
    """Entry path for a kernel/device tree: a rootfs path, or a virtual entry for a host file.

    A ``str`` is a path inside the rootfs. A ``Path`` is a file on the build machine: inside
    ``root`` it maps to its rootfs path; outside, it becomes the virtual entry ``virtual``.
    """
    if isinstance(given, Path):
        host = Path(os.path.abspath(given))
        base = Path(os.path.abspath(root))
        if host.is_relative_to(base):
            given = "/" + host.relative_to(base).as_posix()
        else:
            try:
                sha, size, _ = _hash_file(host)
            except OSError as e:
                raise ManifestError(f"cannot read {what} {given}: {e.strerror}") from None
            if virtual in entries:
                raise ManifestError(f"{what} {given}: {virtual} is given twice")
            # mode means nothing on a boot partition; fixed so host umasks cause no diff
            entries[virtual] = Entry(virtual, "file", 0o644, size, sha, None, False)
            return virtual
    try:
        path = normalize(given, what)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    if path not in entries:
        raise ManifestError(f"{what} {path} is not in the root filesystem {root}")
    return path


def build_manifest(
    root: Path,
    *,
    app_dirs: Sequence[str] = DEFAULT_APP_DIRS,
    kernel: str | Path | None = None,
    dtbs: Sequence[str | Path] = (),
    exclude: Sequence[str] = (MANIFEST_PATH, MARKER_PATH),
) -> Manifest:
    """Walk the tree at ``root`` (symlinks not followed) and describe every path.

    ``kernel``/``dtbs``: a ``str`` is a path inside the rootfs (``"/boot/zImage"``, must exist); a
    ``Path`` is a file on the build machine — inside ``root`` it means its rootfs path, outside it
    is recorded as the virtual entry ``@kernel`` / ``@dtb/<file name>``.
    """
    try:
        app = tuple(normalize(d, "app directory") for d in app_dirs)
        excluded = tuple(sorted({normalize(p, "excluded path") for p in exclude}))
    except ValueError as e:
        raise ManifestError(str(e)) from None
    if not root.is_dir():
        raise ManifestError(f"root filesystem {root} is not a directory")
    entries = scan_tree(root, exclude=excluded)
    kernel_path = None if kernel is None else _boot_file(root, kernel, "@kernel", entries, "kernel")
    dtb_paths = tuple(
        _boot_file(root, d, f"@dtb/{Path(d).name}", entries, "device tree") for d in dtbs
    )
    log.debug("manifest of %s: %d entries", root, len(entries))
    return Manifest(dict(sorted(entries.items())), app, kernel_path, dtb_paths, f"sshfwup {__version__}", excluded)
