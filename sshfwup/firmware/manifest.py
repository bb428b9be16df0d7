"""The root filesystem manifest and the HOT_RELOAD marker.

The firmware build writes both into the root filesystem it is about to pack:

- the marker (``/srv/app/HOT_RELOAD``): ``true`` or ``false`` — may this firmware be hot-swapped?
- the manifest (``/usr/share/sshfwup/manifest.json``): every path of the tree → kind, mode, size,
  sha256 (files), target (symlinks) and whether it is native code; plus the app directories and
  where the kernel and device trees are, when the build knows them.

This module is their public interface; each part lives in the module named for its job:

- :mod:`.manifest_model`: what a manifest says (``Entry``, ``Manifest``, paths, limits, ``ManifestError``);
- :mod:`.rootfs_paths`: paths inside a tree on the host (``inside``, ``resolve_in_root``, ``read_rootfs_file``);
- :mod:`.native_code`: is a file native code (by name and mode, or by content as the device judges);
- :mod:`.manifest_build`: describing a tree (``scan_tree``) and building the manifest (``build_manifest``);
- :mod:`.manifest_io`: the manifest's and the marker's files (dump, write, read, load).
"""

from __future__ import annotations

from .manifest_build import Classifier, Deadline, build_manifest, scan_tree
from .manifest_io import dump_manifest, load_manifest, read_marker, write_manifest, write_marker
from .manifest_model import (
    DEFAULT_APP_DIRS,
    FORMAT,
    MANIFEST_PATH,
    MARKER_PATH,
    MAX_MANIFEST_BYTES,
    MAX_MARKER_BYTES,
    Entry,
    EntryKind,
    Manifest,
    ManifestError,
)
from .native_code import is_native, native_by_content, native_name
from .rootfs_paths import inside, read_rootfs_file, resolve_in_root

__all__ = [
    "DEFAULT_APP_DIRS",
    "FORMAT",
    "MANIFEST_PATH",
    "MARKER_PATH",
    "MAX_MANIFEST_BYTES",
    "MAX_MARKER_BYTES",
    "Classifier",
    "Deadline",
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
