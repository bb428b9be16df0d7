"""Paths inside a root filesystem tree on the host (a build directory, a mounted slot): which app
directory holds a path, where it is on the host with symlinks resolved as if the tree were ``/``,
and reading one file of it safely."""

from __future__ import annotations

import os
import posixpath
import stat
from collections import deque
from collections.abc import Iterable
from pathlib import Path

from .manifest_model import ManifestError

__all__ = ["host_path", "inside", "normalize", "read_rootfs_file", "resolve_in_root"]

_MAX_SYMLINKS = 40


def normalize(path: str, what: str) -> str:
    """``path`` as a normalized absolute path; ValueError (naming ``what``) when it is relative."""
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path inside the root filesystem, got {path!r}")
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/")  # normpath keeps a leading "//"


def inside(path: str, dirs: Iterable[str]) -> bool:
    """Is ``path`` one of ``dirs`` or below one? ``/srv/application`` is not inside ``/srv/app``."""
    if not path.startswith("/"):
        return False  # virtual entries (@kernel) live outside the tree
    path = normalize(path, "path")
    for d in dirs:
        d = normalize(d, "directory")
        if d == "/" or path == d or path.startswith(d + "/"):
            return True
    return False


def host_path(root: Path, path: str) -> Path:
    """Where ``path`` of the tree at ``root`` is on the host (symlinks not resolved)."""
    return root.joinpath(*[p for p in path.split("/") if p])


def resolve_in_root(root: Path, path: str) -> Path:
    """Host path of ``path`` inside ``root``, following symlinks as if ``root`` were ``/``.

    A mounted slot's absolute symlinks must resolve inside that slot, not in the running system.
    A missing component ends the walk; the returned path then simply does not exist.
    """
    parts = deque(p for p in path.split("/") if p not in ("", "."))
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.popleft()
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            return root.joinpath(*resolved, part, *parts)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                raise ManifestError(f"{path}: too many levels of symbolic links")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def read_rootfs_file(root: Path, path: str, *, limit: int, what: str) -> bytes | None:
    """The bytes of ``path`` inside the tree at ``root``; None when it does not exist.

    ``what`` names the file in errors ("manifest", "HOT_RELOAD marker"). Raises ManifestError
    when it exists but is not a readable regular file of at most ``limit`` bytes.
    """
    host = resolve_in_root(root, path)
    try:
        # O_NONBLOCK: opening a FIFO planted at this path must not hang the inspection
        fd = os.open(host, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ManifestError(f"{what} {path} is not a regular file")
            data = f.read(limit + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except IsADirectoryError:
        raise ManifestError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:
        raise ManifestError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:
        raise ManifestError(f"{what} {path} is larger than {limit} bytes")
    return data
