"""Hot or reboot? One pure rule over two manifests and a marker, used on the device and the host.

A new firmware may be hot-swapped (the app process restarted from the new slot, no reboot) only if

- its HOT_RELOAD marker says ``true``, and
- both manifests are present, readable and within the device's bounds, and
- every difference between them lies inside the app directories, and
- no added or changed file there is native code (``.so``, ELF, non-script executables, scripts
  whose ``#!`` runs a program outside the app that is not a known interpreter) — judged from the
  files' content, not from what the manifest claims, and
- nothing matching the interpreter patterns changed, and
- the new slot's app files are exactly what its manifest says (checked within a time limit).

**The device decides what is inspected** (:class:`Policy`): the app directories, the
interpreter patterns, the paths left out of the comparison and the bounds come from its
configuration; the *running* firmware's manifest may add excluded paths; the new firmware's
manifest never does — its ``app_dirs`` and ``excluded`` are claims, not policy.

Everything else reboots. The verdict lists every reason, most serious first:

1. a manifest missing or unusable (new firmware first, then the running one)
2. the HOT_RELOAD marker missing, unreadable or ``false``
3. app files that do not match the new manifest, or could not be checked
4. kernel changed
5. device tree changed
6. kernel modules (``/lib/modules``, ``/usr/lib/modules``) changed
7. interpreter changed
8. native code in the app changed
9. other changes outside the app, one reason per top-level directory, sorted

Each change lands in exactly one of 4-9, first match in that order, so a kernel at
``/boot/zImage`` reads "kernel changed" rather than "/boot changed". A kernel (or device trees)
recorded by only one of the two manifests cannot be proven unchanged and counts as changed. A
directory added or removed together with its contents is not a reason of its own. ``.dtb``/``.dtbo``
files outside the app read as device trees even when the build did not name them.

The device (``inspect_slot``) and the host (``sshfwup firmware diff``, which extracts the app
directories from the ``.fw``) both check the app files with ``check_app_files`` and end in
``decide``, with the same policy: the same verdict, tested for equality.
"""

from __future__ import annotations

import fnmatch
import logging
import posixpath
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .manifest import (
    DEFAULT_APP_DIRS,
    MANIFEST_PATH,
    MARKER_PATH,
    MAX_MANIFEST_BYTES,
    MAX_MARKER_BYTES,
    Deadline,
    Entry,
    Manifest,
    ManifestError,
    inside,
    load_manifest,
    native_by_content,
    native_name,
    read_marker,
    read_rootfs_file,
    scan_tree,
)

if TYPE_CHECKING:
    from sshfwup.config import Config

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INTERPRETER",
    "AppCheck",
    "Change",
    "ManifestState",
    "MarkerState",
    "Policy",
    "Verdict",
    "check_app_files",
    "decide",
    "diff_manifests",
    "inspect_slot",
    "read_slot",
    "resource_reasons",
    "verify_app_files",
]

DEFAULT_INTERPRETER: tuple[str, ...] = ("/usr/bin/python3*", "/usr/lib/python3*")
_MODULE_DIRS = ("/lib/modules", "/usr/lib/modules")
_DTB_EXTENSIONS = (".dtb", ".dtbo")
_LISTED = 3  # paths named in one reason before "and N more"

ManifestState = Manifest | ManifestError | None  # None: missing; ManifestError: unusable
MarkerState = bool | ManifestError | None


@dataclass(frozen=True)
class Policy:
    """What the device inspects and how far it goes: its configuration, never the new firmware's."""

    app_dirs: tuple[str, ...] = DEFAULT_APP_DIRS
    interpreter: tuple[str, ...] = DEFAULT_INTERPRETER
    exclude: tuple[str, ...] = ()  # never compared (besides the manifest and the marker)
    manifest_path: str = MANIFEST_PATH
    marker_path: str = MARKER_PATH
    max_manifest_size: int = MAX_MANIFEST_BYTES
    max_manifest_entries: int = 100_000
    hash_timeout: float = 60.0

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        i = config.inspect
        return cls(
            tuple(config.app_dirs), tuple(i.interpreter), tuple(i.exclude), i.manifest, i.marker,
            i.max_manifest_size, i.max_manifest_entries, i.hash_timeout,
        )  # fmt: skip

    def excluded(self, running: ManifestState) -> tuple[str, ...]:
        """Left out of every comparison: the policy's paths, the manifest and the marker (they
        change with every build), and what the *running* firmware's manifest excluded."""
        own = (*self.exclude, self.manifest_path, self.marker_path)
        return (*own, *running.excluded) if isinstance(running, Manifest) else own


@dataclass(frozen=True)
class AppCheck:
    """The new tree's app files against its manifest (``check_app_files``)."""

    mismatches: tuple[str, ...] = ()  # missing, extra or different from the manifest
    native: tuple[str, ...] = ()  # native code by content (the device's rule)
    problem: str | None = None  # the check could not be completed: why


@dataclass(frozen=True)
class Change:
    path: str
    kind: Literal["added", "removed", "changed"]
    in_app: bool
    native: bool  # the new entry (the old one when removed) is native code
    what: str  # added/removed: the entry's kind; changed: "kind", "content", "symlink target", "mode"…


@dataclass(frozen=True)
class Verdict:
    hot: bool
    reasons: tuple[str, ...]
    changes: tuple[Change, ...]
    old_version: str | None = None  # filled in by callers that know it (dataclasses.replace)
    new_version: str | None = None

    def summary(self) -> str:
        return "hot reload" if self.hot else "reboot required: " + ", ".join(self.reasons)

    def __str__(self) -> str:
        return self.summary()

    def to_json(self) -> dict[str, Any]:
        return {
            "hot": self.hot,
            "summary": self.summary(),
            "reasons": list(self.reasons),
            "changes": [
                {"path": c.path, "kind": c.kind, "in_app": c.in_app, "native": c.native, "what": c.what}
                for c in self.changes
            ],
            "old_version": self.old_version,
            "new_version": self.new_version,
        }


# --- the diff ------------------------------------------------------------------------------


def _differences(old: Entry, new: Entry) -> str:
    if old.kind != new.kind:
        return "kind"
    found = []
    if old.sha256 != new.sha256 or old.size != new.size:
        found.append("content")
    if old.target != new.target:
        found.append("symlink target" if new.kind == "symlink" else "device node")
    if old.mode != new.mode:
        found.append("mode")
    return ", ".join(found)


def _native(entry: Entry) -> bool:
    return entry.native or native_name(entry.path)


def diff_manifests(
    old: Manifest, new: Manifest, *, app_dirs: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> tuple[Change, ...]:
    """Every added, removed and changed entry, sorted by path.

    ``app_dirs`` decides ``Change.in_app`` (default: the running manifest's). Paths in
    ``exclude`` and those the *running* manifest excluded are not compared; what the new
    manifest excludes is compared like anything else.
    """
    dirs = tuple(old.app_dirs if app_dirs is None else app_dirs)
    skipped = (*exclude, *old.excluded)
    changes = []
    for path in sorted(old.entries.keys() | new.entries.keys()):
        if inside(path, skipped):
            continue
        before, after = old.entries.get(path), new.entries.get(path)
        in_app = inside(path, dirs)
        if before is None and after is not None:
            changes.append(Change(path, "added", in_app, _native(after), after.kind))
        elif after is None and before is not None:
            changes.append(Change(path, "removed", in_app, _native(before), before.kind))
        elif before is not None and after is not None and (what := _differences(before, after)):
            changes.append(Change(path, "changed", in_app, _native(after), what))
    return tuple(changes)


# --- the rule ------------------------------------------------------------------------------


def _listing(items: Sequence[str]) -> str:
    if len(items) <= _LISTED:
        return ", ".join(items)
    return ", ".join(items[:_LISTED]) + f" and {len(items) - _LISTED} more"


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _interpreter_key(path: str, patterns: Sequence[str]) -> str | None:
    """The shortest ancestor-or-self of ``path`` matching an interpreter pattern."""
    if not path.startswith("/"):
        return None
    parts = path.split("/")[1:]
    for i in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:i])
        if any(fnmatch.fnmatchcase(prefix, p) for p in patterns):
            return prefix
    return None


def _group(path: str) -> str:
    for d in _MODULE_DIRS:
        if inside(path, (d,)):
            return d
    if not path.startswith("/"):
        return path  # a virtual entry the build did not name as kernel or device tree
    return "/" + path.split("/")[1]


def _grouped(name: str, paths: Sequence[str]) -> str:
    """``/etc changed (/etc/hostname)`` or ``/etc changed (3 files)``."""
    if len(paths) == 1:
        return f"{name} changed" if paths[0] == name else f"{name} changed ({paths[0]})"
    return f"{name} changed ({_files(len(paths))})"


def _change_reasons(
    old: Manifest, new: Manifest, changes: Sequence[Change], interpreter: Sequence[str]
) -> list[str]:
    kernel_paths = {p for p in (old.kernel, new.kernel) if p is not None}
    dtb_paths = {*old.dtbs, *new.dtbs}
    kernel = False
    dtb_names: set[str] = set()
    interp: dict[str, list[str]] = defaultdict(list)
    native: list[str] = []
    modules: dict[str, list[str]] = defaultdict(list)
    outside: dict[str, list[str]] = defaultdict(list)
    # A directory added or removed together with its contents is said by its contents.
    parents = {posixpath.dirname(c.path) for c in changes}
    for c in changes:
        if c.what == "dir" and c.kind != "changed" and c.path in parents:
            continue
        if c.path in kernel_paths:
            kernel = True
        elif c.path in dtb_paths or (not c.in_app and c.path.endswith(_DTB_EXTENSIONS)):
            dtb_names.add(posixpath.basename(c.path))
        elif (key := _interpreter_key(c.path, interpreter)) is not None:
            interp[key].append(c.path)
        elif c.in_app:
            if c.native and c.kind != "removed":
                native.append(c.path)
        elif (group := _group(c.path)) in _MODULE_DIRS:
            modules[group].append(c.path)
        else:
            outside[group].append(c.path)

    reasons = []
    # A kernel/device tree recorded by only one side cannot be proven unchanged.
    if kernel:
        reasons.append("kernel changed")
    elif (old.kernel is None) != (new.kernel is None):
        side = "running" if old.kernel is None else "new"
        reasons.append(f"kernel changed (not recorded in the {side} firmware)")
    if dtb_names:
        reasons.append(f"device tree changed ({_listing(sorted(dtb_names))})")
    elif bool(old.dtbs) != bool(new.dtbs):
        side = "running" if not old.dtbs else "new"
        reasons.append(f"device tree changed (not recorded in the {side} firmware)")
    reasons.extend(_grouped(d, paths) for d, paths in sorted(modules.items()))
    if interp:
        shown = [paths[0] if len(paths) == 1 else f"{k} ({_files(len(paths))})" for k, paths in sorted(interp.items())]
        reasons.append(f"interpreter changed ({_listing(shown)})")
    if native:
        reasons.append(f"native code in the app changed ({_listing(native)})")
    reasons.extend(_grouped(d, paths) for d, paths in sorted(outside.items()))
    return reasons


def _check_dirs(dirs: Iterable[str], what: str) -> tuple[str, ...]:
    out = tuple(dirs)
    for d in out:
        if not isinstance(d, str) or not d.startswith("/"):
            raise ValueError(f"{what} must be absolute paths inside the root filesystem, got {d!r}")
    return out


def decide(
    old: ManifestState,
    new: ManifestState,
    marker: MarkerState,
    *,
    app_dirs: Sequence[str],
    interpreter: Sequence[str] = DEFAULT_INTERPRETER,
    app_mismatches: Sequence[str] = (),
    app: AppCheck | None = None,
    exclude: Sequence[str] = (),
) -> Verdict:
    """The rule (see the module docstring). Pure: same inputs, same verdict, on device and host.

    ``old``/``new``: the running and the new firmware's manifest; None when missing, a
    ManifestError when unreadable. ``marker``: the new firmware's HOT_RELOAD marker, same
    convention. ``app``: the new tree's app files checked against its manifest
    (``check_app_files``); ``app_mismatches`` is its mismatches alone. ``exclude``: the
    policy's paths left out of the comparison (the running manifest's are added).
    """
    app = app or AppCheck(tuple(app_mismatches))
    dirs = _check_dirs(app_dirs, "app_dirs")
    patterns = _check_dirs(interpreter, "interpreter patterns")
    reasons: list[str] = []
    for state, side in ((new, "new"), (old, "running")):
        if state is None:
            reasons.append(f"manifest missing in the {side} firmware")
        elif isinstance(state, ManifestError):
            reasons.append(f"manifest unusable in the {side} firmware: {state}")
        elif not isinstance(state, Manifest):
            raise TypeError(f"expected a Manifest, a ManifestError or None, got {state!r}")
    if marker is None:
        reasons.append("HOT_RELOAD marker missing")
    elif isinstance(marker, ManifestError):
        reasons.append(str(marker))
    elif marker is False:
        reasons.append("HOT_RELOAD marker says false")
    elif marker is not True:
        raise TypeError(f"expected the marker as True, False, a ManifestError or None, got {marker!r}")
    if app.problem:
        reasons.append(f"app files could not be checked: {app.problem}")
    elif app.mismatches:
        reasons.append(f"app files do not match the manifest ({_listing(sorted(app.mismatches))})")
    changes: tuple[Change, ...] = ()
    if isinstance(old, Manifest) and isinstance(new, Manifest):
        native = set(app.native)  # the content's word over the manifest's claim
        changes = tuple(
            replace(c, native=True) if c.path in native and not c.native and c.kind != "removed" else c
            for c in diff_manifests(old, new, app_dirs=dirs, exclude=exclude)
        )
        reasons.extend(_change_reasons(old, new, changes, patterns))
    return Verdict(hot=not reasons, reasons=tuple(reasons), changes=changes)


# --- the device side -----------------------------------------------------------------------


def check_app_files(root: Path, manifest: Manifest, policy: Policy, *, exclude: Sequence[str]) -> AppCheck:
    """The app directories of the tree at ``root`` against ``manifest``, the device's way.

    Missing, extra and changed entries all count; so does running out of ``hash_timeout``. A hot
    swap runs exactly these files, so they are hashed for real and their content says whether
    they are native code; the rest of the slot is trusted (fwup checked the image's hashes).
    ``exclude``: ``Policy.excluded`` of the running manifest, never the new manifest's own list.
    """
    dirs = _check_dirs(policy.app_dirs, "app_dirs")
    skipped = tuple(exclude)
    patterns = tuple(policy.interpreter)

    def classify(path: str, mode: int, head: bytes) -> bool:
        return native_by_content(path, mode, head, app_dirs=dirs, interpreter=patterns) is not None

    deadline = Deadline(policy.hash_timeout, "hashing the new app files ([inspect] hash_timeout)")
    try:
        actual = scan_tree(root, dirs, exclude=skipped, classify=classify, deadline=deadline)
    except (ManifestError, OSError) as e:
        log.warning("cannot check the app directories of %s: %s", root, e)
        return AppCheck(tuple(dirs), (), str(e))
    expected = {p: e for p, e in manifest.entries.items() if inside(p, dirs) and not inside(p, skipped)}
    mismatched = []
    for path in sorted(actual.keys() | expected.keys()):
        have, want = actual.get(path), expected.get(path)
        if have is None:
            problem = "missing"
        elif want is None:
            problem = "not in the manifest"
        elif what := _differences(want, have):
            problem = f"{what} differs from the manifest"
        else:
            continue
        log.warning("app file %s in %s: %s", path, root, problem)
        mismatched.append(path)
    native = tuple(p for p, e in actual.items() if e.native)
    return AppCheck(tuple(mismatched), native)


def verify_app_files(
    root: Path, manifest: Manifest, *, app_dirs: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[str, ...]:
    """Paths under ``app_dirs`` in the tree at ``root`` that differ from ``manifest`` (besides
    ``exclude``, the default manifest and marker paths are never compared)."""
    policy = Policy(tuple(app_dirs))
    return check_app_files(root, manifest, policy, exclude=(*policy.excluded(None), *exclude)).mismatches


FileReader = Callable[..., "bytes | None"]  # read(path, *, limit, what) -> bytes, or None if missing


def read_states(
    read: FileReader,
    *,
    manifest_path: str,
    marker_path: str,
    max_size: int = MAX_MANIFEST_BYTES,
    max_entries: int | None = None,
) -> tuple[ManifestState, MarkerState]:
    """Manifest and marker through ``read`` — a mounted tree on the device, a squashfs image on
    the host — each None when missing or a ManifestError when bad (or beyond the bounds): one
    reading, one wording."""
    try:
        data = read(manifest_path, limit=max_size, what="manifest")
        manifest: ManifestState = (
            None if data is None else load_manifest(data, name=manifest_path, max_size=max_size, max_entries=max_entries)
        )
    except ManifestError as e:
        manifest = e
    try:
        marker: MarkerState = read_marker(
            read(marker_path, limit=MAX_MARKER_BYTES, what="HOT_RELOAD marker"), name=marker_path
        )
    except ManifestError as e:
        marker = e
    return manifest, marker


def read_slot(
    root: Path, *, manifest_path: str = MANIFEST_PATH, marker_path: str = MARKER_PATH, policy: Policy | None = None
) -> tuple[ManifestState, MarkerState]:
    """A mounted tree's manifest and marker, each None when missing or a ManifestError when bad."""
    p = policy or Policy(manifest_path=manifest_path, marker_path=marker_path)
    return read_states(
        lambda path, **kw: read_rootfs_file(root, path, **kw), manifest_path=p.manifest_path,
        marker_path=p.marker_path, max_size=p.max_manifest_size, max_entries=p.max_manifest_entries,
    )  # fmt: skip


def inspect_slot(
    running_root: Path,
    new_root: Path,
    policy: Policy | None = None,
    *,
    manifest_path: str = MANIFEST_PATH,
    marker_path: str = MARKER_PATH,
    app_dirs: Sequence[str] = DEFAULT_APP_DIRS,
    interpreter: Sequence[str] = DEFAULT_INTERPRETER,
) -> Verdict:
    """The verdict for the new slot mounted at ``new_root`` against the running root, under the
    device's ``policy`` (default: one made of the keyword arguments).

    Blocking file I/O (hashes the app files): from async code run it in a worker thread.
    """
    if policy is None:
        policy = Policy(tuple(app_dirs), tuple(interpreter), (), manifest_path, marker_path)
    old, _ = read_slot(running_root, policy=policy)
    new, marker = read_slot(new_root, policy=policy)
    exclude = policy.excluded(old)
    app = check_app_files(new_root, new, policy, exclude=exclude) if isinstance(new, Manifest) else AppCheck()
    verdict = decide(
        old, new, marker, app_dirs=policy.app_dirs, interpreter=policy.interpreter, app=app,
        exclude=policy.excluded(None),
    )  # fmt: skip
    log.info("inspect %s: %s (%d changes)", new_root, verdict.summary(), len(verdict.changes))
    return verdict


# --- everything else the .fw installs ------------------------------------------------------------


def with_resources(
    verdict: "Verdict",
    installed: Mapping[str, tuple[int, str]] | None,
    new: Mapping[str, tuple[int, str]],
    rootfs: str = "rootfs.img",
) -> "Verdict":
    """``verdict`` with the reboot reasons of every resource of the new ``.fw`` other than the root
    filesystem (:func:`resource_reasons`). ``installed`` None: the running firmware's resources
    are not on record, so any other resource in the new firmware cannot be shown unchanged."""
    if installed is None:
        others = sorted(name for name in new if name != rootfs)
        reasons = [f"firmware resource {name} cannot be compared (the installed firmware's is not on record)"
                   for name in others]  # fmt: skip
    else:
        reasons = resource_reasons(installed, new, rootfs)
    if not reasons:
        return verdict
    kept = () if verdict.hot else verdict.reasons
    return replace(verdict, hot=False, reasons=(*kept, *reasons))


def resource_reasons(
    installed: Mapping[str, tuple[int, str]], new: Mapping[str, tuple[int, str]], rootfs: str = "rootfs.img"
) -> list[str]:
    """Reboot reasons for the resources of a ``.fw`` other than the root filesystem.

    ``installed``/``new``: resource name → (size, blake2b hex) from the installed firmware's and
    the new firmware's meta.conf. A kernel, device tree or boot file written to a boot partition
    is its own resource; any one added, removed or changed means reboot. The root filesystem is
    left to the manifest comparison. Sorted by resource name.
    """
    reasons = []
    for name in sorted(installed.keys() | new.keys()):
        if name == rootfs:
            continue
        before, after = installed.get(name), new.get(name)
        if before is None:
            reasons.append(f"firmware resource {name} added")
        elif after is None:
            reasons.append(f"firmware resource {name} removed")
        elif before != after:
            size = f", {before[0]} → {after[0]} bytes" if before[0] != after[0] else ""
            reasons.append(f"firmware resource {name} changed (blake2b differs{size})")
    return reasons
