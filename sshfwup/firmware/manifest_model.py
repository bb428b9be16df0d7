"""What a root filesystem manifest says: one ``Entry`` per path, the ``Manifest`` around them,
where both files sit in the tree and how large a device lets them be.

Paths inside the rootfs are absolute POSIX strings (``/srv/app/app.py``). A kernel or device tree
that the build passes from outside the rootfs (written to a boot partition) is recorded as a
*virtual* entry — ``@kernel``, ``@dtb/<name>`` — with its size and sha256, so a change is still seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sshfwup import __version__

__all__ = [
    "DEFAULT_APP_DIRS",
    "FORMAT",
    "MANIFEST_PATH",
    "MARKER_PATH",
    "MAX_MANIFEST_BYTES",
    "MAX_MARKER_BYTES",
    "Entry",
    "EntryKind",
    "Manifest",
    "ManifestError",
]

MANIFEST_PATH = "/usr/share/sshfwup/manifest.json"
MARKER_PATH = "/srv/app/HOT_RELOAD"
FORMAT = "sshfwup-manifest/1"
DEFAULT_APP_DIRS: tuple[str, ...] = ("/srv/app",)

MAX_MANIFEST_BYTES = 16 * 1024 * 1024  # ~90k entries; [inspect] max_manifest_size on a device
MAX_MARKER_BYTES = 4096

EntryKind = Literal["file", "dir", "symlink", "other"]


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
