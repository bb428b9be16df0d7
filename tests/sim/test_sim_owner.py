"""Simulated devices die with whoever started them, a later run removes what a killed one left
(and only that), and a taken port stops a device with one clear error instead of a restart loop.

Real processes throughout: an "owner" script plays a test run (it provisions a device and starts
it with ``SimMachine``) and is SIGKILLed; the machine, ``sshfwup serve`` and the app are real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sshfwup.system import procs
from sshfwup.sim.device import (
    MARKER_ENV,
    OWNER_ENV,
    SimDevice,
    cleanup,
    loop_devices,
    machine_pids,
    marked_processes,
    mounts,
    owner_of,
    runtime_dir,
)
from sshfwup.sim.host import KeyPair, free_port
from sshfwup.sim.machine import MachineError, MachineState, SimMachine
from sshfwup.sim.stale import remove_stale

from conftest import FirmwareFactory, Sim

# A test run in miniature: provision a device, start it with SimMachine, say the machine's and the
# server's pids, then wait to be killed. It never powers the device off by itself.
OWNER_SCRIPT = r"""
import json, sys, anyio
from pathlib import Path
from sshfwup.sim.device import SimDevice
from sshfwup.sim.machine import SimMachine

path, firmware, fwup, key, ssh_port, app_port = sys.argv[1:7]
device = SimDevice.create(Path(path), firmware=Path(firmware), fwup=fwup, authorized_keys=[key],
                          ssh_port=int(ssh_port), app_port=int(app_port))

async def main():
    machine = SimMachine.start(device.path)
    state = await machine.wait_up(timeout=90)
    print(json.dumps({"machine": machine.process.pid, "server": state.server_pid}), flush=True)
    await anyio.sleep(3600)

anyio.run(main)
"""

GONE_WITHIN = 40.0  # the machine's graceful power-off: the server's stop, the app's drain, unmounts


def mounted_under(path: Path) -> list[Path]:
    return [m.mount_point for m in mounts() if m.mount_point == path or path in m.mount_point.parents]


def traces(path: Path) -> dict[str, list[object]]:
    """Everything of the device at ``path`` still on this machine (empty lists: nothing)."""
    return {
        "machines": list(machine_pids(path)),
        "processes": list(marked_processes(path)),
        "mounts": [*mounted_under(path), *mounted_under(runtime_dir(path))],
        "loops": [loop.name for loop in loop_devices(path / "disk.img")],
    }


def nothing_left(path: Path) -> bool:
    return not any(traces(path).values())


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001 - a test helper
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


@contextmanager
def owner_process(path: Path, firmware: Path, fwup: str, key: KeyPair) -> Iterator[tuple[subprocess.Popen[str], dict[str, int]]]:
    """The owner script running a device at ``path``; killed and the device cleaned up after."""
    argv = [sys.executable, "-c", OWNER_SCRIPT, str(path), str(firmware), fwup, key.public_line,
            str(free_port()), str(free_port())]  # fmt: skip
    owner = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        if not line:
            owner.wait(30)
            raise AssertionError(f"the owner script failed: {owner.stderr.read() if owner.stderr else ''}")
        yield owner, json.loads(line)
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait(30)
        cleanup(path)


# --- the owner's death ------------------------------------------------------------------------


def test_a_killed_owner_takes_its_device_down(tmp_path: Path, firmware: FirmwareFactory, fwup: str, client_key: KeyPair) -> None:
    path = tmp_path / "device"
    with owner_process(path, firmware("1.0.0"), fwup, client_key) as (owner, pids):
        assert procs.alive(pids["machine"]) and procs.alive(pids["server"])
        assert marked_processes(path), "the server and the app carry the machine's marker"
        before = traces(path)
        assert before["mounts"] and len(before["loops"]) == 3, before

        owner.send_signal(signal.SIGKILL)  # runs no cleanup of its own
        owner.wait(10)
        started = time.monotonic()
        # Powered off = its mounts and loops gone *and* its processes exited (the machine unmounts
        # before it exits: checking the processes at the instant the last loop went away raced).
        wait_for(
            lambda: nothing_left(path) and not procs.alive(pids["machine"]) and not procs.alive(pids["server"]),
            GONE_WITHIN, f"the device to power itself off: {traces(path)}",
        )  # fmt: skip
        log = (path / "machine.log").read_text()

    assert "owner (pid" in log and "is gone; powering off" in log, log[-2000:]
    state = MachineState.read(path)
    assert state is not None and state.state == "off", state
    print(f"powered off {time.monotonic() - started:.1f} s after the owner's SIGKILL")


def test_a_process_is_its_pid_and_its_start_time() -> None:
    me = procs.ProcessRef.of(os.getpid())
    assert me is not None and me.alive()
    assert procs.ProcessRef.parse(me.token) == me
    assert not procs.ProcessRef(me.pid, me.start + 1).alive()  # the same pid, another process
    child = subprocess.Popen(["true"])
    ref = procs.ProcessRef.of(child.pid)
    child.wait()
    assert ref is None or not ref.alive()
    assert procs.ProcessRef.parse("12") is None and procs.ProcessRef.parse("a:b") is None


# --- what a killed run left, removed by the next ------------------------------------------------


async def test_the_next_run_removes_a_killed_runs_device_and_leaves_live_ones(
    tmp_path: Path, firmware: FirmwareFactory, fwup: str, client_key: KeyPair
) -> None:
    stale_path, live_path = tmp_path / "stale", tmp_path / "live"
    try:
        live = SimDevice.create(
            live_path, firmware=firmware("1.0.0"), fwup=fwup, authorized_keys=[client_key.public_line],
            ssh_port=free_port(), app_port=free_port(),
        )  # fmt: skip
        async with SimMachine.start(live.path) as live_machine:
            live_state = await live_machine.wait_up(timeout=90)
            with owner_process(stale_path, firmware("1.0.0"), fwup, client_key) as (owner, pids):
                # a run killed hard: first its machine (nothing powers the device off), then itself
                os.kill(pids["machine"], signal.SIGKILL)
                wait_for(lambda: not procs.alive(pids["machine"]), 10, "the machine to die")
                owner.kill()
                owner.wait(10)
                left = traces(stale_path)
                assert left["processes"] and left["mounts"] and len(left["loops"]) == 3, left
                orphans = set(left["processes"])
                assert pids["server"] in orphans

                dry = subprocess.run(
                    [sys.executable, "-m", "sshfwup", "sim", "cleanup", "--dry-run"],
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                assert dry.returncode == 0 and f"would remove {stale_path} " in dry.stdout, dry.stdout + dry.stderr
                assert str(live_path) not in dry.stdout and traces(stale_path) == left

                report = subprocess.run(
                    [sys.executable, "-m", "sshfwup", "sim", "cleanup"], capture_output=True, text=True, timeout=120
                )
                assert report.returncode == 0, report.stdout + report.stderr
                lines = report.stdout.splitlines()
                print(report.stdout)
                ours = [line for line in lines if str(stale_path) in line]
                assert all(str(live_path) not in line for line in lines), lines
                for pid in orphans:
                    assert any(f"killed pid {pid} " in line for line in ours), (pid, lines)
                for point in left["mounts"]:
                    assert any(line.endswith(f"unmounted {point}") for line in ours), (point, lines)
                for loop in left["loops"]:
                    assert any(f"detached {loop} " in line for line in ours), (loop, lines)
                assert nothing_left(stale_path), traces(stale_path)
                assert owner_of(stale_path) is None  # its runtime directory (and record) went too

            # the live device was not touched: same machine, same server, still serving
            now = live_machine.state()
            assert now is not None and now.ready and now.server_pid == live_state.server_pid, now
            assert now.server_restarts == 0 and procs.alive(live_state.server_pid)
            assert owner_of(live_path) == procs.ProcessRef.of(os.getpid())
            assert remove_stale().removed == ()  # and a second pass finds nothing to remove
            again = live_machine.state()
            assert again is not None and (again.server_pid, again.boot_count, again.server_restarts) == (
                now.server_pid, now.boot_count, 0,
            ), again
    finally:
        cleanup(live_path)
        cleanup(stale_path)


@pytest.mark.parametrize("owner_alive", [True, False])
def test_the_owner_is_its_pid_and_start_time(tmp_path: Path, owner_alive: bool) -> None:
    """A record naming this very process (alive) keeps the device; one naming this pid with
    another start time — the pid reused by someone else — is a dead owner's: its mount goes."""
    path = tmp_path / "device"
    runtime = runtime_dir(path)
    me = procs.ProcessRef.of(os.getpid())
    assert me is not None
    recorded = me if owner_alive else procs.ProcessRef(me.pid, me.start - 1)
    try:
        (runtime / "root").mkdir(parents=True)
        (runtime / "run").mkdir()
        (runtime / "owner.json").write_text(json.dumps({"pid": recorded.pid, "start": recorded.start}))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sshfwup-test", str(runtime / "root")], check=True)
        report = remove_stale()
        ours = [line for line in report.removed if str(path) in line]
        if owner_alive:
            assert ours == [] and mounted_under(runtime) == [runtime / "root"], report
        else:
            assert ours == [
                f"stale simulated device {path} (owner pid {me.pid} is gone): unmounted {runtime / 'root'}",
                f"stale simulated device {path} (owner pid {me.pid} is gone): removed {runtime}",
            ], report
            assert mounted_under(runtime) == [] and not runtime.exists()
    finally:
        cleanup(path)


def test_a_new_pytest_session_removes_and_reports_a_dead_owners_device(tmp_path: Path) -> None:
    """The conftest's session start: a device whose owner is gone (here: its record names a
    process that no longer exists, and a mount is left) is removed before any test runs."""
    path = tmp_path / "device"
    runtime = runtime_dir(path)
    gone = subprocess.Popen(["true"])
    ref = procs.ProcessRef.of(gone.pid) or procs.ProcessRef(gone.pid, 1)
    gone.wait()
    try:
        (runtime / "root").mkdir(parents=True)
        (runtime / "run").mkdir()
        (runtime / "owner.json").write_text(json.dumps({"pid": ref.pid, "start": ref.start}))
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sshfwup-test", str(runtime / "root")], check=True)
        session = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/supervisor/test_procs.py", "-k", "zombie"],
            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert f"sshfwup: stale simulated device {path} (owner pid {ref.pid} is gone): unmounted {runtime / 'root'}" in (
            session.stdout
        ), session.stdout + session.stderr
        assert mounted_under(runtime) == [] and not runtime.exists()
    finally:
        cleanup(path)


async def test_processes_carry_their_owner(
    tmp_path: Path, firmware: FirmwareFactory, fwup: str, client_key: KeyPair
) -> None:
    path = tmp_path / "device"
    try:
        device = SimDevice.create(
            path, firmware=firmware("1.0.0"), fwup=fwup, authorized_keys=[client_key.public_line],
            ssh_port=free_port(), app_port=free_port(),
        )  # fmt: skip
        async with SimMachine.start(device.path) as machine:
            state = await machine.wait_up(timeout=90)
            me = procs.ProcessRef.of(os.getpid())
            assert me is not None
            found = procs.processes_with_variables((OWNER_ENV, MARKER_ENV))
            assert found[state.server_pid] == {OWNER_ENV: me.token, MARKER_ENV: str(device.path)}
            assert found[machine.process.pid] == {OWNER_ENV: me.token}
            with urllib.request.urlopen(f"http://127.0.0.1:{device.app_port}/", timeout=5) as r:
                app_pid = json.loads(r.read())["pid"]
            assert found[app_pid] == {OWNER_ENV: me.token, MARKER_ENV: str(device.path)}
    finally:
        cleanup(path)


# --- a taken port -------------------------------------------------------------------------------


@contextmanager
def held_port() -> Iterator[tuple[socket.socket, int]]:
    """A port on 127.0.0.1 that this test process listens on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen()
    try:
        yield sock, sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def stub_device(tmp_path: Path, firmware: FirmwareFactory, fwup: str) -> Iterator[SimDevice]:
    path = tmp_path / "dev"
    try:
        yield SimDevice.create(path, firmware=firmware("1.0.0"), fwup=fwup, ssh_port=free_port(), app_port=free_port())
    finally:
        cleanup(path)


def _stub_argv(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "stub.py"
    script.write_text(body)
    return [sys.executable, str(script), "{device}"]


@pytest.mark.parametrize("which", ["ssh", "app"])
async def test_a_taken_port_is_one_clear_error_and_no_restart(stub_device: SimDevice, tmp_path: Path, which: str) -> None:
    # the stub records that it ran: with a taken port nothing may even start
    stub = _stub_argv(tmp_path, "import pathlib, sys, time\n(pathlib.Path(sys.argv[1]) / 'stub-ran').touch()\ntime.sleep(300)\n")
    with held_port() as (_, port):
        if which == "ssh":
            stub_device.ssh_port = port
        else:
            stub_device.app_port = port
        stub_device.save()
        started = time.monotonic()
        async with SimMachine.start(stub_device.path, server_command=stub) as machine:
            with pytest.raises(MachineError) as raised:
                await machine.wait_up(timeout=30)
            assert machine.process.wait(10) == 1
    message = str(raised.value).splitlines()[0]
    assert f"127.0.0.1:{port} is in use" in message and f"the {'SSH' if which == 'ssh' else 'app'} port" in message
    assert f"held by pid {os.getpid()} " in message, message
    assert time.monotonic() - started < 20
    state = MachineState.read(stub_device.path)
    assert state is not None and (state.state, state.server_restarts, state.boot_count) == ("off", 0, 1), state
    assert not (stub_device.path / "stub-ran").exists()
    assert nothing_left(stub_device.path), traces(stub_device.path)


async def test_a_server_that_cannot_listen_is_not_restarted(stub_device: SimDevice, tmp_path: Path) -> None:
    # a port taken between the machine's check and the server's bind: the server exits 3
    stub = _stub_argv(tmp_path, "import pathlib, sys\n(pathlib.Path(sys.argv[1]) / 'stub-ran').open('a').write('x')\nsys.exit(3)\n")
    async with SimMachine.start(stub_device.path, server_command=stub) as machine:
        with pytest.raises(MachineError, match="cannot listen \\(exit status 3\\); not restarting it"):
            await machine.wait_up(timeout=30)
        assert machine.process.wait(10) == 1
    await_log = (stub_device.path / "machine.log").read_text()
    assert (stub_device.path / "stub-ran").read_text() == "x"  # started once, never again
    assert "restarting" not in await_log.replace("not restarting", ""), await_log
    state = MachineState.read(stub_device.path)
    assert state is not None and state.server_restarts == 0 and state.state == "off", state
    assert nothing_left(stub_device.path)


def test_sim_run_in_a_terminal_says_which_port_is_taken(stub_device: SimDevice, tmp_path: Path) -> None:
    with held_port() as (_, port):
        stub_device.ssh_port = port
        stub_device.save()
        result = subprocess.run(
            [sys.executable, "-m", "sshfwup", "sim", "run", str(stub_device.path),
             "--server-command", json.dumps([sys.executable, "-c", "import time; time.sleep(300)"])],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"127.0.0.1:{port} is in use: held by pid {os.getpid()}" in errors[0], result.stderr
    assert "restarting" not in result.stderr
    assert nothing_left(stub_device.path)


@pytest.mark.parametrize("which", ["ssh", "app"])
def test_serve_that_cannot_listen_exits_3_with_one_message(sim: Sim, tmp_path: Path, which: str) -> None:
    """The real ``sshfwup serve`` against a running device's root, its own data and run dirs
    (the device's server and app are not disturbed), with one of its ports held by this test."""
    import tomllib

    from sshfwup.sim.toml_write import dumps

    document = tomllib.loads(sim.device.config_path.read_text())
    mine = tmp_path / "second"
    mine.mkdir()
    document["server"].update(
        data_dir=str(mine / "data"), run_dir=str(mine / "run"), lock_file=str(mine / "run/update.lock"),
        host_key=str(mine / "host_key"), port=free_port(),
    )  # fmt: skip
    with held_port() as (_, port):
        if which == "ssh":
            document["server"]["port"] = port
            document.pop("app")
        else:
            document["app"]["sockets"] = [f"http=tcp:127.0.0.1:{port}"]
        config = mine / "sshfwup.toml"
        config.write_text(dumps(document))
        result = subprocess.run(
            [sys.executable, "-m", "sshfwup", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    problems = [line for line in result.stderr.splitlines() if line.startswith("sshfwup serve: ")]
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and len(problems) == 1, result.stderr
    setting = "[server] listen, port" if which == "ssh" else "[app] sockets"
    assert f"127.0.0.1:{port}" in problems[0] and setting in problems[0], problems
    assert "address already in use" in problems[0].lower() and f"held by pid {os.getpid()} " in problems[0], problems
    assert sim.machine.state().server_restarts == 0 and sim.app()["version"] == "1.0.0"  # untouched
