"""sshfwup.system.procs with real processes marked by a variable unique to each test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshfwup.system import procs

VARIABLE = "SSHFWUP_TEST_PROCS"
Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def entry() -> str:
    return f"{VARIABLE}={uuid.uuid4().hex}"


@pytest.fixture
def spawn(entry: str) -> Iterator[Spawn]:
    """Start ``python -c code`` with the test's entry in its environment; all are ended afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(code: str, *, marked: bool = True, **kwargs: object) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if marked:
            name, _, value = entry.partition("=")
            env[name] = value
        argv = [sys.executable, "-c", code]
        process = subprocess.Popen(argv, env=env, **kwargs)  # type: ignore[call-overload]
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=5)
        for pid in procs.processes_with(entry):  # grandchildren in sessions of their own
            procs.send_signal(pid, signal.SIGKILL)
        assert procs.wait_gone(procs.processes_with(entry), 5.0) == []


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


SLEEPER = "import time; time.sleep(60)"


def test_finds_marked_processes_only(spawn: Spawn, entry: str) -> None:
    marked = spawn(SLEEPER)
    other = spawn(SLEEPER, marked=False)
    wait_for(lambda: procs.processes_with(entry) == [marked.pid])
    assert procs.alive(other.pid)
    assert procs.processes_with(entry + "x") == []  # a whole entry, not a prefix


def test_the_caller_and_its_ancestors_are_never_found(spawn: Spawn, entry: str, tmp_path: Path) -> None:
    sibling = spawn(SLEEPER)
    out = tmp_path / "found"
    # A marked parent runs a marked child that looks: neither of them is in the answer.
    child = f"from sshfwup.system import procs; open({str(out)!r}, 'w').write(repr(procs.processes_with({entry!r})))"
    parent = spawn(f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    assert parent.wait(timeout=10) == 0
    assert out.read_text() == repr([sibling.pid])


def test_a_zombie_is_not_alive(spawn: Spawn, entry: str) -> None:
    process = spawn("pass")
    wait_for(lambda: Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z")
    assert not procs.alive(process.pid)
    assert procs.processes_with(entry) == []
    process.wait()
    assert not procs.alive(process.pid)  # reaped: gone altogether
    assert not procs.send_signal(process.pid, signal.SIGTERM)


def test_end_kills_what_left_its_session(spawn: Spawn, entry: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild"
    code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    parent = spawn(code)
    wait_for(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    sweep = procs.end_processes_with(entry, timeout=5.0)
    pids = tuple(sorted([parent.pid, grandchild]))
    assert sweep == procs.Sweep(pids, (), killed=pids)
    assert parent.wait(timeout=5) == -signal.SIGKILL
    assert not procs.alive(grandchild)


def test_grace_lets_a_process_exit_on_sigterm(spawn: Spawn, entry: str, tmp_path: Path) -> None:
    done = tmp_path / "terminated"
    code = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(done)!r}, 'w').close(), sys.exit(3)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = spawn(code, stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    sweep = procs.end_processes_with(entry, grace=5.0, timeout=1.0)
    assert sweep == procs.Sweep((process.pid,), (), killed=())  # it exited on SIGTERM
    assert process.wait(timeout=5) == 3 and done.exists()


def test_sigkill_follows_when_sigterm_is_ignored(spawn: Spawn, entry: str) -> None:
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = spawn(code, stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    began = time.monotonic()
    sweep = procs.end_processes_with(entry, grace=0.3, timeout=5.0)
    assert sweep == procs.Sweep((process.pid,), (), killed=(process.pid,))
    assert process.wait(timeout=5) == -signal.SIGKILL
    assert time.monotonic() - began >= 0.3


def test_wait_gone_returns_the_ones_still_alive(spawn: Spawn) -> None:
    process = spawn(SLEEPER)
    began = time.monotonic()
    assert procs.wait_gone([process.pid], 0.2) == [process.pid]
    assert time.monotonic() - began >= 0.2
    process.kill()
    process.wait()
    assert procs.wait_gone([process.pid], 1.0) == []


def test_end_repeats_until_a_scan_finds_nothing(
    spawn: Spawn, entry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A child forked right after a scan is only seen by the next one: hide one from the first scan.
    first, late = spawn(SLEEPER), spawn(SLEEPER)
    wait_for(lambda: procs.processes_with(entry) == sorted([first.pid, late.pid]))
    scan = procs.processes_with
    scans: list[list[int]] = []

    def scan_missing_late_once(wanted: str) -> list[int]:
        found = scan(wanted)
        scans.append(found)
        return [pid for pid in found if pid != late.pid] if len(scans) == 1 else found

    monkeypatch.setattr(procs, "processes_with", scan_missing_late_once)
    sweep = procs.end_processes_with(entry, timeout=5.0)
    pids = tuple(sorted([first.pid, late.pid]))
    assert sweep == procs.Sweep(pids, (), killed=pids)
    assert first.wait(timeout=5) == late.wait(timeout=5) == -signal.SIGKILL
