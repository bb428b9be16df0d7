"""The application's room: whom it runs as, what it sees, and what dies with it.

The supervisor runs as root (it mounts slots, writes the disk through fwup, binds port 22). The
application it starts gets none of that:

- **user and groups** ``[app] user``/``group``/``supplementary_groups`` (default: the dedicated
  unprivileged user ``sshfwup-app``): it cannot read the host key, authorized_keys, the update
  journal or ``/etc/shadow``;
- **capabilities**: every capability outside ``[app] capabilities`` is removed from its bounding
  set; the listed ones are raised as ambient capabilities so a non-root app really has them;
- **no new privileges** (``PR_SET_NO_NEW_PRIVS``): a setuid binary or file capability it
  executes gains nothing;
- **a clean environment**: ``PATH``, ``HOME``, ``USER``, ``LOGNAME``, ``LANG`` and the
  variables named in ``[app] pass_env`` — not the server's environment;
- **a cgroup of its own** per instance when one can be had (``[app] cgroup``): stopping the
  instance kills everything it started (``cgroup.kill``), however it detached itself.

This module decides all of it on the server side and hands it to the exec shim
(:func:`sshfwup.app._exec_app`) as ``--room JSON``; the shim applies it in the child right
before ``exec``, the only place it can be done for that process alone.
"""

from __future__ import annotations

import functools
import grp
import json
import logging
import os
import pwd
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# CAPABILITIES is defined beside the [app] capabilities it checks (config needs no supervisor module);
# importable from here as before.
from sshfwup.config import CAPABILITIES, AppConfig

log = logging.getLogger(__name__)

__all__ = [
    "CAPABILITIES",
    "DEFAULT_PATH",
    "Room",
    "RoomError",
    "cgroup_for",
    "delegated_cgroup",
    "is_delegated",
    "prepare_room",
    "release_cgroup",
]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # systemd's
_CGROUP_PREFIX = "app-"
_RELEASE_WAIT = 0.2  # killed processes leave their cgroup within microseconds; never block long


class RoomError(Exception):
    """The app cannot be given the room its configuration asks for (unknown user, ...)."""


@dataclass(frozen=True)
class Room:
    """Everything the exec shim applies. ``uid``/``gid`` None: keep the server's."""

    user: str
    uid: int | None
    gid: int | None
    groups: tuple[int, ...]
    home: str
    capabilities: tuple[int, ...]
    cgroup: Path | None  # this instance's cgroup (created by the shim), or None
    pass_env: tuple[str, ...] = ()

    def environment(self, server_environment: Mapping[str, str]) -> dict[str, str]:
        """The base environment (the supervisor adds ``[app] env`` and the protocol variables)."""
        env = {"PATH": DEFAULT_PATH, "HOME": self.home, "USER": self.user, "LOGNAME": self.user, "LANG": "C.UTF-8"}
        env.update((name, server_environment[name]) for name in self.pass_env if name in server_environment)
        return env

    def shim_options(self) -> list[str]:
        spec = {
            "uid": self.uid,
            "gid": self.gid,
            "groups": list(self.groups),
            "caps": list(self.capabilities),
            "cgroup": str(self.cgroup) if self.cgroup else None,
        }
        return ["--room", json.dumps(spec, separators=(",", ":"))]


def prepare_room(config: AppConfig, instance_id: str) -> Room:
    """The room for one instance. Raises RoomError with what to fix in the configuration."""
    caps = tuple(sorted(CAPABILITIES[name.upper()] for name in config.capabilities))
    parent = _cgroup_parent(config.cgroup)
    cgroup = cgroup_for(parent, instance_id) if parent else None
    if not config.user:
        entry = _passwd(os.getuid())
        return Room(entry[0], None, None, (), entry[1], caps, cgroup, config.pass_env)
    try:
        user = pwd.getpwnam(config.user)
    except KeyError:
        raise RoomError(
            f"[app] user {config.user!r} does not exist on this device; create it "
            f"(useradd --system --no-create-home --shell /usr/sbin/nologin {config.user}) or set [app] user"
        ) from None
    gid = _group_id(config.group, "[app] group") if config.group else user.pw_gid
    groups = tuple(sorted({_group_id(g, "[app] supplementary_groups") for g in config.supplementary_groups}))
    if os.geteuid() != 0 and user.pw_uid != os.geteuid():
        raise RoomError(f"the server runs as uid {os.geteuid()}, not root: it cannot start the app as {config.user!r}")
    return Room(config.user, user.pw_uid, gid, groups, user.pw_dir, caps, cgroup, config.pass_env)


def _passwd(uid: int) -> tuple[str, str]:
    try:
        entry = pwd.getpwuid(uid)
        return entry.pw_name, entry.pw_dir
    except KeyError:
        return str(uid), "/"


def _group_id(name: str, key: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise RoomError(f"{key}: group {name!r} does not exist on this device") from None


# --- cgroups ---------------------------------------------------------------------------------


def cgroup_for(parent: Path, instance_id: str) -> Path:
    """The cgroup of one instance: a fixed name per instance id, so it can be found to release."""
    # Two checksums, not a hash from hashlib: that loads OpenSSL's libcrypto into the supervisor
    # (~4 MiB of a process meant to stay small), and a name needs no cryptography.
    raw = instance_id.encode()
    return parent / f"{_CGROUP_PREFIX}{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"


def _cgroup_parent(setting: str) -> Path | None:
    if setting == "off":
        return None
    if setting == "auto":
        return delegated_cgroup()
    parent = Path(setting)
    if not (parent / "cgroup.procs").is_file():
        raise RoomError(f"[app] cgroup: {parent} is not a cgroup2 directory")
    if not os.access(parent, os.W_OK):
        raise RoomError(f"[app] cgroup: {parent} is not writable by the server")
    _remove_empty_instance_cgroups(parent)
    return parent


@functools.cache
def delegated_cgroup() -> Path | None:
    """The server's own cgroup2 directory when the service manager delegated it to us.

    systemd marks the cgroup of a unit with ``Delegate=yes`` with the extended attribute
    ``trusted.delegate`` (``user.delegate`` in a user manager) since version 251. Without the
    mark, sub-cgroups are not ours to make: the app's processes are then found by their
    environment marker only (see :mod:`sshfwup.supervisor.supervisor`).
    """
    own = _own_cgroup()
    if own is None:
        log.info("no cgroup2 hierarchy: app processes are tracked by their environment marker only")
        return None
    if not is_delegated(own):
        log.info("cgroup %s is not delegated to sshfwup (systemd: Delegate=yes): no per-instance cgroups", own)
        return None
    log.info("app instances run in cgroups of their own below %s", own)
    _remove_empty_instance_cgroups(own)
    return own


def is_delegated(cgroup: Path) -> bool:
    """Marked as delegated by the service manager, and writable by us."""
    for name in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(cgroup, name).strip() in (b"1", b"yes", b"true"):
                return os.access(cgroup, os.W_OK)
        except OSError:
            continue
    return False


def _own_cgroup() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    for line in mountinfo:
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            mount_point = before.split(" ")[4].replace("\\040", " ")
            return Path(mount_point) / relative.lstrip("/")
    return None


def _remove_empty_instance_cgroups(parent: Path) -> None:
    """Instance cgroups an earlier run could not remove (rmdir fails on populated ones)."""
    try:
        stale = [p for p in parent.iterdir() if p.name.startswith(_CGROUP_PREFIX)]
    except OSError:
        return
    for path in stale:
        try:
            path.rmdir()
        except OSError:
            pass


def release_cgroup(path: Path | None) -> list[int]:
    """Kill every process left in an instance's cgroup and remove it; returns the pids seen.

    Called when the instance's main process has exited: whatever it started (daemonized, in a
    new session, with a scrubbed environment) is still in the cgroup, and dies here.
    """
    if path is None:
        return []
    try:
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []  # never created: the instance failed before joining it
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path / "cgroup.procs", e)
        pids = []
    if pids:
        try:
            (path / "cgroup.kill").write_text("1")
        except OSError:  # kernels before 5.14: one by one
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
    deadline = time.monotonic() + _RELEASE_WAIT
    while True:
        try:
            path.rmdir()
            return pids
        except FileNotFoundError:
            return pids
        except OSError:
            if time.monotonic() > deadline:
                log.warning("cgroup %s is still busy; it is removed at a later start", path)
                return pids
            time.sleep(0.005)
