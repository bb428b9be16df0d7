"""The app's room (sshfwup/supervisor/room.py + the exec shim in sshfwup/app/__init__.py), checked from inside the app.

A probe app (tests/apps/room_probe.py) reports its ids, capability sets, no_new_privs, cgroup,
environment and which secrets it can read; the supervisor starts it exactly as on a device.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import Sim

from sshfwup.system import procs
from sshfwup.supervisor import room
from sshfwup.config import AppConfig
from sshfwup.supervisor.room import CAPABILITIES, RoomError, prepare_room, release_cgroup
from sshfwup.sim.device import app_interpreter, ensure_app_user
from sshfwup.sim.rootfs import SITE_PACKAGES, install_app_library
from sshfwup.supervisor.supervisor import AppNotReady, AppSource, Supervisor

PROBE = Path(__file__).resolve().parents[1] / "apps" / "room_probe.py"
APP_USER = AppConfig().user
CGROUP2 = next(
    (Path(line.split(" - ")[0].split()[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()
     if " - cgroup2 " in line),
    None,
)  # fmt: skip


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the app's user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="sshfwup-room-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def secret(public_dir: Path) -> Path:
    """A root-only file, like the SSH host key."""
    path = public_dir / "ssh_host_ed25519_key"
    path.write_text("secret\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def cgroup_parent() -> Iterator[Path]:
    if CGROUP2 is None or not os.access(CGROUP2, os.W_OK):
        pytest.skip("no writable cgroup2 hierarchy on this machine")
    path = Path(tempfile.mkdtemp(prefix="sshfwup-test-", dir=CGROUP2))
    try:
        yield path
    finally:
        for child in path.iterdir():
            if child.is_dir():
                release_cgroup(child)
        path.rmdir()


def probe_config(public_dir: Path, *args: str, **overrides: Any) -> AppConfig:
    user = ensure_app_user(APP_USER)
    (public_dir / "reports").mkdir(mode=0o777, exist_ok=True)
    os.chmod(public_dir / "reports", 0o777)
    app_dir = public_dir / "rootfs" / "srv" / "app"
    app_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROBE, app_dir / "room_probe.py")
    # sshfwup.app from the tree, as a firmware has it: the checkout may be out of the user's reach
    install_app_library(public_dir / "rootfs")
    for d in [public_dir / "rootfs", *(p for p in (public_dir / "rootfs").rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)
    config = AppConfig(
        command=(app_interpreter(user), "{app_dir}/room_probe.py", *args),
        app_dir="/srv/app",
        env=(("PROBE_REPORT", str(public_dir / "reports" / "report.json")), ("PYTHONPATH", "{root}" + SITE_PACKAGES)),
        ready_timeout=10.0,
        drain_timeout=2.0,
        observe=0.0,
        cgroup="off",
    )
    return replace(config, **overrides)


@asynccontextmanager
async def running(config: AppConfig, public_dir: Path) -> AsyncIterator[dict[str, Any]]:
    async with Supervisor(config, marker=f"room-test:{public_dir}") as sup:
        await sup.start(AppSource(public_dir / "rootfs", "a", "1.0.0"))
        yield json.loads((public_dir / "reports" / "report.json").read_text())


def _gone(pid: int) -> bool:
    return not procs.alive(pid)


async def test_the_app_runs_unprivileged_in_a_clean_environment(public_dir: Path, secret: Path) -> None:
    suid = public_dir / "suid-id"  # a setuid-root program, as a firmware could ship one
    shutil.copy("/usr/bin/id", suid)
    os.chmod(suid, 0o4755)
    os.environ["SSHFWUP_TEST_SERVER_SECRET"] = "from the server's environment"
    try:
        config = probe_config(public_dir, "/etc/shadow", str(secret))
        config = replace(config, env=(*config.env, ("PROBE_SUID", str(suid))))
        async with running(config, public_dir) as report:
            pass
    finally:
        del os.environ["SSHFWUP_TEST_SERVER_SECRET"]
    user = ensure_app_user(APP_USER)
    # without no_new_privs the same user would become root through that program
    plain = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", str(suid), "-u"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert plain.stdout.strip() == "0"
    assert report["setuid_euid"] == user.pw_uid
    assert (report["uid"], report["euid"], report["gid"]) == (user.pw_uid, user.pw_uid, user.pw_gid)
    assert report["groups"] in ([], [user.pw_gid])  # no supplementary groups of root's
    assert report["readable"] == {"/etc/shadow": False, str(secret): False}
    assert (report["cap_bnd"], report["cap_eff"], report["cap_amb"]) == (0, 0, 0)
    assert report["no_new_privs"] == 1
    assert report["raw_socket"] is False
    env = report["env"]
    assert "SSHFWUP_TEST_SERVER_SECRET" not in env
    assert env["USER"] == APP_USER and env["PATH"] == room.DEFAULT_PATH and env["LANG"] == "C.UTF-8"
    allowed = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "PYTHONPATH", "PROBE_REPORT", "PROBE_SUID", "NOTIFY_SOCKET"}
    unexpected = {k for k in env if k not in allowed and not k.startswith(("SSHFWUP_", "LISTEN_"))}
    assert not unexpected, unexpected
    os.kill(report["grandchild"], signal.SIGKILL)  # cgroup = off: see the cgroup test


async def test_configured_capabilities_groups_and_variables_are_kept(public_dir: Path) -> None:
    os.environ["SSHFWUP_TEST_PASSED"] = "yes"
    try:
        config = probe_config(
            public_dir, capabilities=("CAP_NET_RAW",), supplementary_groups=("dialout",),
            pass_env=("SSHFWUP_TEST_PASSED", "NOT_SET_ANYWHERE"),
        )  # fmt: skip
        async with running(config, public_dir) as report:
            pass
    finally:
        del os.environ["SSHFWUP_TEST_PASSED"]
    net_raw = 1 << CAPABILITIES["CAP_NET_RAW"]
    assert (report["cap_bnd"], report["cap_eff"], report["cap_amb"]) == (net_raw, net_raw, net_raw)
    assert report["raw_socket"] is True and report["no_new_privs"] == 1
    assert report["uid"] == ensure_app_user(APP_USER).pw_uid
    import grp

    assert grp.getgrnam("dialout").gr_gid in report["groups"]
    assert report["env"]["SSHFWUP_TEST_PASSED"] == "yes" and "NOT_SET_ANYWHERE" not in report["env"]
    os.kill(report["grandchild"], signal.SIGKILL)


async def test_everything_the_app_started_dies_with_its_cgroup(public_dir: Path, cgroup_parent: Path) -> None:
    # Without a cgroup, a detached grandchild with an empty environment outlives its app ...
    async with running(probe_config(public_dir), public_dir) as report:
        escaped = report["grandchild"]
    assert not _gone(escaped)
    os.kill(escaped, signal.SIGKILL)
    # ... with one, it dies with the instance, and the instance's cgroup is removed.
    async with running(probe_config(public_dir, cgroup=str(cgroup_parent)), public_dir) as report:
        grandchild = report["grandchild"]
        line = report["cgroup"].strip().splitlines()[-1]
        assert line.startswith("0::") and line.endswith(f"/{cgroup_parent.name}/" + line.rsplit("/", 1)[1])
        instance = cgroup_parent / line.rsplit("/", 1)[1]
        assert str(grandchild) in (instance / "cgroup.procs").read_text().split()
    assert procs.wait_gone([grandchild], 5.0) == []
    assert not instance.exists()


def test_a_delegated_cgroup_is_recognised(cgroup_parent: Path) -> None:
    assert not room.is_delegated(cgroup_parent)
    os.setxattr(cgroup_parent, "trusted.delegate", b"1")  # what systemd sets for Delegate=yes
    assert room.is_delegated(cgroup_parent)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"user": "no-such-user-x"}, "[app] user 'no-such-user-x' does not exist on this device; create it"),
        ({"group": "no-such-group-x"}, "[app] group: group 'no-such-group-x' does not exist"),
        ({"supplementary_groups": ("no-such-group-x",)}, "[app] supplementary_groups: group 'no-such-group-x'"),
        ({"cgroup": "/sys/fs/cgroup/no/such/cgroup"}, "[app] cgroup: /sys/fs/cgroup/no/such/cgroup is not a cgroup2"),
    ],
)
async def test_an_impossible_room_is_a_clear_start_failure(
    public_dir: Path, overrides: dict[str, Any], message: str
) -> None:
    config = probe_config(public_dir, **overrides)
    with pytest.raises(RoomError, match=message.replace("[", r"\[").replace("]", r"\]")):
        prepare_room(config, "x")
    async with Supervisor(config, marker=f"room-test:{public_dir}") as sup:
        with pytest.raises(AppNotReady, match="could not be started: " + message[:20].replace("[", r"\[").replace("]", r"\]")):
            await sup.start(AppSource(public_dir / "rootfs", "a", "1.0.0"))
    assert not (public_dir / "reports" / "report.json").exists()


async def test_the_sample_app_on_the_simulated_device_runs_as_its_own_user(sim: Sim) -> None:
    pid = sim.app()["pid"]
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    user = ensure_app_user(APP_USER)
    uid = user.pw_uid
    assert status["Uid"].split() == [str(uid)] * 4
    assert int(status["CapBnd"], 16) == 0 and status["NoNewPrivs"].strip() == "1"
    host_key = sim.device.server_data_dir / "ssh_host_ed25519_key"
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={user.pw_gid}", "--clear-groups", "cat", str(host_key)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "Permission denied" in result.stderr
