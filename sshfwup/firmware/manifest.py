"""The root filesystem manifest and the HOT_RELOAD marker.

The firmware build writes both into the root filesystem it is about to pack:

- the marker (``/srv/app/HOT_RELOAD``): ``true`` or ``false`` — may this firmware be hot-swapped?
- the manifest (``/usr/share/sshfwup/manifest.json``): every path of the tree → kind, mode, size,
  sha256 (files), target (symlinks) and whether it is native code; plus the app directories and
  where the kernel and device trees are, when the build knows them.

Build order: ``write_marker`` → ``build_manifest`` → ``write_manifest``. The marker and the manifest
exclude themselves (they change every build); the excluded paths are recorded in the manifest so
every reader skips the same ones.

Paths inside the rootfs are absolute POSIX strings (``/srv/app/app.py``). A kernel or device tree
that the build passes from outside the rootfs (written to a boot partition) is recorded as a
*virtual* entry — ``@kernel``, ``@dtb/<name>`` — with its size and sha256, so a change is still seen.

On disk the manifest is JSON with sorted keys and one line per entry (diffable), the entries
inside the app directories last (an app change then changes only the manifest's end, which keeps
delta updates small; readers do not depend on the order); modes are octal
strings (``"0755"``). Same tree → same bytes: nothing depends on time, walk order or the host.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sshfwup import __version__
from sshfwup.system.fsutil import write_atomically

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_APP_DIRS",
    "FORMAT",
    "MANIFEST_PATH",
    "MARKER_PATH",
    "Entry",
    "EntryKind",
    "Manifest",
    "ManifestError",
    "build_manifest",
    "dump_manifest",
    "inside",
    "is_native",
    "load_manifest",
    "native_by_content",
    "native_name",
    "read_marker",
    "read_rootfs_file",
    "resolve_in_root",
    "scan_tree",
    "write_manifest",
    "write_marker",
]

MANIFEST_PATH = "/usr/share/sshfwup/manifest.json"
MARKER_PATH = "/srv/app/HOT_RELOAD"
FORMAT = "sshfwup-manifest/1"
DEFAULT_APP_DIRS: tuple[str, ...] = ("/srv/app",)

MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # ~90k entries; [inspect] max_manifest_size on a device
MAX_MARKER_BYTES = 4096
_CHUNK = 1024 * 1024
_HEAD = 256  # bytes kept of each file: ELF magic, and the #! line as the kernel reads it (BINPRM_BUF_SIZE)
_ELF_MAGIC = b"\x7fELF"
_NATIVE_NAME = re.compile(r"\.so(\.[0-9]+)*$|\.ko(\.(gz|xz|zst))?$")
_SCRIPT_EXTENSIONS = frozenset({".py", ".sh", ".bash", ".pl", ".rb", ".lua", ".js", ".tcl", ".awk"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODE = re.compile(r"^[0-7]{3,6}$")
_MAX_SYMLINKS = 40

EntryKind = Literal["file", "dir", "symlink", "other"]
_KINDS: frozenset[str] = frozenset({"file", "dir", "symlink", "other"})


class ManifestError(Exception):
    """A manifest or marker is missing a piece, unreadable, corrupt or not ours."""


@dataclass(frozen=True)
class Entry:
    """One path of the root filesystem (or a virtual ``@kernel`` / ``@dtb/<name>`` entry).

    ``size`` and ``sha256`` describe files only (0 and None otherwise; directory sizes differ
    between filesystems). ``target`` is a symlink's target, or for ``other`` the node type
    (``fifo``, ``socket``, ``char 1:3``, ``block 8:0``).
    """

    path: str
    kind: EntryKind
    mode: int  # permission bits, st_mode & 0o7777
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    native: bool = False


@dataclass(frozen=True)
class Manifest:
    entries: Mapping[str, Entry]
    app_dirs: tuple[str, ...] = DEFAULT_APP_DIRS
    kernel: str | None = None  # an entry path: "/boot/zImage" or "@kernel"
    dtbs: tuple[str, ...] = ()  # entry paths: "/boot/sim.dtb" or "@dtb/sim.dtb"
    created_by: str = f"sshfwup {__version__}"
    excluded: tuple[str, ...] = (MANIFEST_PATH, MARKER_PATH)  # left out of the tree on purpose


# --- paths ---------------------------------------------------------------------------------


def _normalize(path: str, what: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path inside the root filesystem, got {path!r}")
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/")  # normpath keeps a leading "//"


def inside(path: str, dirs: Iterable[str]) -> bool:
    """Is ``path`` one of ``dirs`` or below one? ``/srv/application`` is not inside ``/srv/app``."""
    if not path.startswith("/"):
        return False  # virtual entries (@kernel) live outside the tree
    path = _normalize(path, "path")
    for d in dirs:
        d = _normalize(d, "directory")
        if d == "/" or path == d or path.startswith(d + "/"):
            return True
    return False


def _host(root: Path, path: str) -> Path:
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


# --- native code ---------------------------------------------------------------------------


def native_name(path: str) -> bool:
    """Named like native code: ``.so``, ``.so.N``, kernel modules ``.ko`` (also compressed)."""
    return bool(_NATIVE_NAME.search(posixpath.basename(path)))


def is_native(path: str, mode: int, head: bytes | None) -> bool:
    """Is this regular file native code?

    ``head`` is the file's first bytes, or None when the content is unknown. By content: ELF
    magic. By name: ``native_name``. An executable that is not a script (no ``#!`` and no script
    extension) is treated as native too: it runs as something other than interpreted source.
    Without content, an executable counts as a script only by its extension (the safe side).
    """
    if head is not None and head.startswith(_ELF_MAGIC):
        return True
    if native_name(path):
        return True
    if not mode & 0o111 or head == b"":  # not executable, or nothing in it to execute
        return False
    if head is not None and head.startswith(b"#!"):
        return False
    return posixpath.splitext(path)[1] not in _SCRIPT_EXTENSIONS


def _shebang_program(head: bytes) -> str | None:
    """The program a ``#!`` line runs: its interpreter, or for ``/usr/bin/env [-S] NAME`` the
    NAME (looked up on PATH at run time)."""
    line = head.split(b"\n", 1)[0][2:].decode("utf-8", errors="replace")
    words = line.split()
    if not words:
        return ""
    if posixpath.basename(words[0]) == "env":
        rest = [w for w in (" ".join(words[1:]).replace("-S", " ", 1).split()) if not w.startswith("-") and "=" not in w]
        return rest[0] if rest else ""
    return words[0]


def native_by_content(
    path: str, mode: int, head: bytes | None, *, app_dirs: Sequence[str], interpreter: Sequence[str]
) -> str | None:
    """Why this regular file counts as native code on the device, or None.

    The device's rule, judged from the file itself, whatever a manifest says: ELF magic; a
    native name (``.so``, ``.ko``); an executable that is not a script; or an executable script
    whose ``#!`` names a program outside ``app_dirs`` that matches none of the ``interpreter``
    patterns (a bare name after ``env`` is matched against their last components) — it runs
    something the hot-reload policy knows nothing about.
    """
    if head is not None and head.startswith(_ELF_MAGIC):
        return "ELF executable or library"
    if native_name(path):
        return "named like a shared object or kernel module"
    if not mode & 0o111 or head == b"":
        return None
    if head is None or not head.startswith(b"#!"):
        return None if posixpath.splitext(path)[1] in _SCRIPT_EXTENSIONS else "executable, not a script"
    program = _shebang_program(head)
    if not program:
        return "#! line names no program"
    if "/" not in program:
        if any(fnmatch.fnmatchcase(program, posixpath.basename(p)) for p in interpreter):
            return None
        return f"#! runs {program!r}, which is not an interpreter of [inspect] interpreter"
    program = posixpath.normpath(program)
    if inside(program, app_dirs) or any(fnmatch.fnmatchcase(program, p) for p in interpreter):
        return None
    return f"#! runs {program}, outside the app and not an interpreter of [inspect] interpreter"


# --- building ------------------------------------------------------------------------------


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
        start = _normalize(start, "scan start")
        if inside(start, exclude):
            continue
        if start == "/":
            stack.append("/")
            continue
        st = _lstat_dir_chain(root, start)
        if st is None:
            continue
        entries[start] = _entry(_host(root, start), start, st, classify, deadline)
        if stat.S_ISDIR(st.st_mode):
            stack.append(start)
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(_host(root, directory)) as it:
                names = sorted(e.name for e in it)
        except OSError as e:
            raise ManifestError(f"cannot list {directory}: {e.strerror}") from None
        for name in names:
            path = posixpath.join(directory, name)
            if inside(path, exclude):
                continue
            host = _host(root, path)
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
        path = _normalize(given, what)
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
        app = tuple(_normalize(d, "app directory") for d in app_dirs)
        excluded = tuple(sorted({_normalize(p, "excluded path") for p in exclude}))
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


# --- writing and reading -------------------------------------------------------------------


def _entry_json(e: Entry) -> dict[str, Any]:
    return {
        "kind": e.kind,
        "mode": f"{e.mode:04o}",
        "native": e.native,
        "sha256": e.sha256,
        "size": e.size,
        "target": e.target,
    }


def dump_manifest(manifest: Manifest) -> bytes:
    """The manifest's file contents: JSON, sorted keys, one line per entry (sorted, those inside
    the app directories last), trailing newline."""
    top: dict[str, Any] = {
        "app_dirs": list(manifest.app_dirs),
        "created_by": manifest.created_by,
        "dtbs": list(manifest.dtbs),
        "entries": None,  # written below, one line each
        "excluded": list(manifest.excluded),
        "format": FORMAT,
        "kernel": manifest.kernel,
    }
    fields = []
    for key in sorted(top):
        if key == "entries":
            order = sorted(manifest.entries, key=lambda path: (inside(path, manifest.app_dirs), path))
            lines = [
                f"  {json.dumps(path)}: {json.dumps(_entry_json(manifest.entries[path]), sort_keys=True)}"
                for path in order
            ]
            value = "{\n" + ",\n".join(lines) + "\n }" if lines else "{}"
        else:
            value = json.dumps(top[key], sort_keys=True)
        fields.append(f" {json.dumps(key)}: {value}")
    return ("{\n" + ",\n".join(fields) + "\n}\n").encode()


def write_manifest(root: Path, manifest: Manifest, path: str = MANIFEST_PATH) -> Path:
    """Write the manifest into the tree at ``root`` (atomically, mode 0644); return the file."""
    target = _host(root, _normalize(path, "manifest path"))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, dump_manifest(manifest), mode=0o644, durable=False)
    return target


def write_marker(root: Path, hot: bool, path: str = MARKER_PATH) -> Path:
    """Write the HOT_RELOAD marker (``true``/``false``) into the tree at ``root``."""
    target = _host(root, _normalize(path, "marker path"))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, b"true\n" if hot else b"false\n", mode=0o644, durable=False)
    return target


def read_marker(source: Path | bytes | None, *, name: str | None = None) -> bool | None:
    """The marker's verdict: True/False, or None when it is missing.

    Anything but ``true``/``false`` (whitespace-trimmed, any case) is a ManifestError naming it.
    """
    where = name or (str(source) if isinstance(source, Path) else "HOT_RELOAD")
    if isinstance(source, Path):
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_MARKER_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise ManifestError(f"cannot read HOT_RELOAD marker {where}: {e.strerror}") from None
    else:
        data = source
    if data is None:
        return None
    word = data[:MAX_MARKER_BYTES].decode("utf-8", errors="replace").strip().lower()
    if len(data) <= MAX_MARKER_BYTES and word in ("true", "false"):
        return word == "true"
    shown = data[:40].decode("utf-8", errors="replace").strip()
    more = "…" if len(data) > 40 else ""
    raise ManifestError(f"HOT_RELOAD marker {where} must say true or false, not {shown!r}{more}")


def _str_list(doc: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"manifest {where} is invalid: {key!r} must be a list of strings")
    return tuple(value)


def _parse_entry(path: Any, raw: Any, where: str) -> Entry:
    def bad(problem: str) -> ManifestError:
        return ManifestError(f"manifest {where} is invalid: entry {path!r}: {problem}")

    if not isinstance(path, str) or not (path.startswith("/") or path.startswith("@")):
        raise bad("path must be absolute (or a virtual @ entry)")
    if path.startswith("/") and _normalize(path, "path") != path:
        raise bad("path is not normalized")
    if not isinstance(raw, dict):
        raise bad("expected an object")
    kind = raw.get("kind")
    if kind not in _KINDS:
        raise bad(f"kind must be one of {', '.join(sorted(_KINDS))}, got {kind!r}")
    mode_text = raw.get("mode")
    if not isinstance(mode_text, str) or not _MODE.match(mode_text):
        raise bad(f"mode must be an octal string such as \"0644\", got {mode_text!r}")
    mode = int(mode_text, 8)
    size = raw.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise bad(f"size must be a non-negative integer, got {size!r}")
    sha = raw.get("sha256")
    target = raw.get("target")
    if kind == "file" and not (isinstance(sha, str) and _SHA256.match(sha)):
        raise bad("a file needs sha256 as 64 lowercase hex digits")
    if kind != "file" and sha is not None:
        raise bad(f"a {kind} has no sha256")
    if kind in ("symlink", "other") and not isinstance(target, str):
        raise bad(f"a {kind} needs a target string")
    if kind in ("file", "dir") and target is not None:
        raise bad(f"a {kind} has no target")
    native = raw.get("native")
    if native is None:  # written by another tool: judge by name and mode
        native = kind == "file" and is_native(path, mode, None)
    if not isinstance(native, bool):
        raise bad(f"native must be true or false, got {native!r}")
    return Entry(path, kind, mode, size, sha, target, native)


def load_manifest(
    source: Path | bytes | str,
    *,
    name: str | None = None,
    max_size: int = MAX_MANIFEST_BYTES,
    max_entries: int | None = None,
) -> Manifest:
    """Parse a manifest from a file (``Path``) or its contents (``bytes``/``str`` = JSON text).

    ``name`` is how errors refer to it (e.g. the path inside the rootfs). ``max_size`` and
    ``max_entries`` bound what a firmware can make the device parse (ManifestError beyond).
    """
    where = name or (str(source) if isinstance(source, Path) else "<data>")
    if isinstance(source, Path):
        try:
            with open(source, "rb") as f:
                data: bytes | str = f.read(max_size + 1)
        except FileNotFoundError:
            raise ManifestError(f"manifest {where} not found") from None
        except OSError as e:
            raise ManifestError(f"cannot read manifest {where}: {e.strerror}") from None
    else:
        data = source
    if len(data) > max_size:
        raise ManifestError(f"manifest {where} is larger than {max_size} bytes ([inspect] max_manifest_size)")
    try:
        doc = json.loads(data)
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {where} is not an sshfwup manifest (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"manifest {where} is not an sshfwup manifest (not JSON: {e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest {where} is not an sshfwup manifest (expected a JSON object)")
    fmt = doc.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("sshfwup-manifest/"):
        raise ManifestError(f'manifest {where} is not an sshfwup manifest (no "format": "{FORMAT}")')
    if fmt != FORMAT:
        raise ManifestError(f"unsupported manifest format {fmt!r} in {where} (this sshfwup reads {FORMAT})")
    raw_entries = doc.get("entries")
    if not isinstance(raw_entries, dict):
        raise ManifestError(f"manifest {where} is invalid: 'entries' must be an object")
    if max_entries is not None and len(raw_entries) > max_entries:
        raise ManifestError(
            f"manifest {where} lists {len(raw_entries)} paths, more than {max_entries} ([inspect] max_manifest_entries)"
        )
    entries = {path: _parse_entry(path, raw, where) for path, raw in sorted(raw_entries.items())}
    kernel = doc.get("kernel")
    if kernel is not None and not isinstance(kernel, str):
        raise ManifestError(f"manifest {where} is invalid: 'kernel' must be a string or null")
    dtbs = _str_list(doc, "dtbs", where)
    for ref in (kernel, *dtbs):
        if ref is not None and ref not in entries:
            raise ManifestError(f"manifest {where} is invalid: {ref} is named as kernel/device tree but has no entry")
    app_dirs = _str_list(doc, "app_dirs", where)
    excluded = _str_list(doc, "excluded", where)
    for p in (*app_dirs, *excluded):
        if not p.startswith("/"):
            raise ManifestError(f"manifest {where} is invalid: {p!r} is not an absolute path")
    created_by = doc.get("created_by", "")
    if not isinstance(created_by, str):
        raise ManifestError(f"manifest {where} is invalid: 'created_by' must be a string")
    return Manifest(entries, app_dirs, kernel, dtbs, created_by, excluded)
