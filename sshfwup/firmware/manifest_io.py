"""The manifest's file and the HOT_RELOAD marker's: writing them into a tree, reading them back.

- the marker (``/srv/app/HOT_RELOAD``): ``true`` or ``false`` — may this firmware be hot-swapped?
- the manifest (``/usr/share/sshfwup/manifest.json``): every path of the tree → kind, mode, size,
  sha256 (files), target (symlinks) and whether it is native code; plus the app directories and
  where the kernel and device trees are, when the build knows them.

On disk the manifest is JSON with sorted keys and one line per entry (diffable), the entries
inside the app directories last (an app change then changes only the manifest's end, which keeps
delta updates small; readers do not depend on the order); modes are octal
strings (``"0755"``). Same tree → same bytes: nothing depends on time, walk order or the host.
Reading checks everything and bounds what a firmware can make the device parse.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sshfwup.system.fsutil import write_atomically

from .manifest_model import (
    FORMAT,
    MANIFEST_PATH,
    MARKER_PATH,
    MAX_MANIFEST_BYTES,
    MAX_MARKER_BYTES,
    Entry,
    Manifest,
    ManifestError,
)
from .native_code import is_native
from .rootfs_paths import host_path, inside, normalize

__all__ = ["dump_manifest", "load_manifest", "read_marker", "write_manifest", "write_marker"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODE = re.compile(r"^[0-7]{3,6}$")
_KINDS: frozenset[str] = frozenset({"file", "dir", "symlink", "other"})


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
    target = host_path(root, normalize(path, "manifest path"))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, dump_manifest(manifest), mode=0o644, durable=False)
    return target


def write_marker(root: Path, hot: bool, path: str = MARKER_PATH) -> Path:
    """Write the HOT_RELOAD marker (``true``/``false``) into the tree at ``root``."""
    target = host_path(root, normalize(path, "marker path"))
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
    if path.startswith("/") and normalize(path, "path") != path:
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
