"""Is a file native code? By name and mode (what the build records in the manifest), or by its
content as the device judges it (ELF, an executable that is no script, a ``#!`` that runs
something outside the app and the known interpreters)."""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Sequence

from .rootfs_paths import inside

__all__ = ["is_native", "native_by_content", "native_name"]

_ELF_MAGIC = b"\x7fELF"
_NATIVE_NAME = re.compile(r"\.so(\.[0-9]+)*$|\.ko(\.(gz|xz|zst))?$")
_SCRIPT_EXTENSIONS = frozenset({".py", ".sh", ".bash", ".pl", ".rb", ".lua", ".js", ".tcl", ".awk"})


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
