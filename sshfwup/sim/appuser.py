"""The app's unprivileged user on this machine, and the host Python it can run (the firmware's
stand-in ``/usr/bin/python3`` execs it)."""

from __future__ import annotations

import functools
import logging
import os
import pwd
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sshfwup.config import AppConfig
from sshfwup.sim.errors import SimError
from sshfwup.sim.rootfs import HOST_INTERPRETERS

log = logging.getLogger(__name__)

__all__ = ["app_interpreter", "check_app_interpreter", "ensure_app_user"]


def ensure_app_user(name: str) -> pwd.struct_passwd:
    """The app's unprivileged user ([app] user), created on this machine when missing.

    A real device gets it from its root filesystem; the simulator shares this machine's user
    database, so it adds a system user the way a firmware build would (no home, no login shell).
    """
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    argv = ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--user-group", name]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    if proc.returncode not in (0, 9):  # 9: created meanwhile by someone else
        raise SimError(f"cannot create the app user {name!r}: {proc.stderr.decode(errors='replace').strip()}")
    log.info("created the app user %s", name)
    return pwd.getpwnam(name)


def _may_execute(path: Path, user: pwd.struct_passwd) -> bool:
    """Does ``user`` have x permission on ``path`` (search, for a directory)? By the mode bits."""
    import grp

    st = path.stat()
    if st.st_uid == user.pw_uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.pw_gid or user.pw_name in grp.getgrgid(st.st_gid).gr_mem:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


_MIN_PYTHON = (3, 11)
_PYTHON_CHECK = "import sys; print('%d.%d' % sys.version_info[:2])"


def app_interpreter(user: pwd.struct_passwd) -> str:
    """The host Python that the firmware's stand-in ``/usr/bin/python3`` execs for ``user``: the
    first of ``rootfs.HOST_INTERPRETERS`` that ``user`` can run and that is new enough.

    The app runs from the mounted slot as its own user; nothing it runs may come from the
    checkout or a venv (they may sit in a 0700 home). Raises SimError naming what is missing and
    how to install it — before a device is made, not in the machine log once it boots.
    """
    return _app_interpreter(user.pw_name, user.pw_uid, user.pw_gid, HOST_INTERPRETERS)


def check_app_interpreter(config_overrides: Mapping[str, Any]) -> str:
    """The host Python a device's app will run on (see app_interpreter), for the [app] user its
    configuration overrides name (else the default one); SimError if there is none its user can
    run. The app user is created when missing."""
    user = config_overrides.get("app", {}).get("user", AppConfig().user)
    return app_interpreter(ensure_app_user(user) if user else pwd.getpwuid(os.geteuid()))


@functools.lru_cache(maxsize=8)  # the host's interpreters do not change under one process
def _app_interpreter(name: str, uid: int, gid: int, candidates: tuple[str, ...]) -> str:
    wanted = ".".join(map(str, _MIN_PYTHON))
    tried = []
    for candidate in candidates:
        problem = _cannot_run(Path(candidate), name, uid, gid)
        if problem is None:
            return candidate
        tried.append(f"{candidate}: {problem}")
    raise SimError(
        f"the simulated device runs its app as the user {name!r} with the host's Python (the firmware's"
        f" /usr/bin/python3 execs {' or '.join(candidates)}), but there is no Python >= {wanted} that"
        f" {name!r} can run ({'; '.join(tried)}); install one: apt-get install python3"
    )


def _cannot_run(path: Path, name: str, uid: int, gid: int) -> str | None:
    """Why ``uid`` cannot run ``path`` as a Python >= _MIN_PYTHON, or None. As root: by running it
    as that user (search permission on every directory, ACLs, the interpreter's own libraries);
    otherwise by the mode bits."""
    if not path.exists():
        return "missing"
    if os.geteuid() != 0 or uid == os.geteuid():
        entry = pwd.getpwuid(uid)
        chain = [path, Path(os.path.realpath(path))]
        if not all(_may_execute(p, entry) for c in chain for p in [*c.parents, c] if p.exists()):
            return f"{name} may not execute it"
        if uid != os.geteuid():
            return None  # cannot switch users to ask its version
    as_user: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if os.geteuid() == 0 else {}
    try:
        proc = subprocess.run(
            [str(path), "-I", "-S", "-c", _PYTHON_CHECK], capture_output=True, text=True, timeout=30, cwd="/",
            env={"PATH": "/usr/bin:/bin"}, check=False, **as_user,
        )  # fmt: skip
    except OSError as e:
        return f"{name} cannot run it: {e.strerror or e}"
    except subprocess.TimeoutExpired:
        return "it did not answer within 30 s"
    if proc.returncode != 0:
        return f"{name} cannot run it: {(proc.stderr.strip().splitlines() or ['exit status %d' % proc.returncode])[-1]}"
    version = proc.stdout.strip()
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()) or (int(major), int(minor)) < _MIN_PYTHON:
        return f"it is Python {version}"
    return None
