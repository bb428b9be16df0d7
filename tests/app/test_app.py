"""sshfwup.app: the application side of the socket hand-over and sd_notify, and the exec shim."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from sshfwup import app

SHIM = Path(app.__file__)

REPORT_SOCKETS = r"""
import json, os, socket
from sshfwup import app
seen = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
sockets = app.listen_sockets()
print(json.dumps({
    "pid": os.getpid(),
    "seen": seen,
    "after": {k: os.environ.get(k) for k in seen},
    "sockets": {
        name: {
            "fd": s.fileno(),
            "family": s.family.name,
            "type": s.type.name,
            "address": s.getsockname(),
            "inheritable": os.get_inheritable(s.fileno()),
            "blocking": s.getblocking(),
        }
        for name, s in sockets.items()
    },
}))
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def spawn_through_shim(
    placed: dict[int, socket.socket], order: list[int], command: list[str], env: dict[str, str]
) -> tuple[int, str]:
    """Run the shim with each socket at a chosen fd number (posix_spawn can place fds anywhere,
    including inside the target range 3..); return (exit status, stdout)."""
    read_end, write_end = os.pipe()
    high = {target: fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for target, sock in placed.items()}
    actions = [(os.POSIX_SPAWN_DUP2, write_end, 1)]
    actions += [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in high.items()]
    argv = [sys.executable, "-I", "-S", str(SHIM), "--sshfwup-exec", str(os.getpid()),
            ",".join(map(str, order)), "--", *command]  # fmt: skip
    try:
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=actions)
    finally:
        os.close(write_end)
        for fd in high.values():
            os.close(fd)
    with os.fdopen(read_end) as output:
        text = output.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.fixture
def listeners(tmp_path: Path) -> Iterator[list[socket.socket]]:
    web = socket.create_server(("127.0.0.1", 0))
    web.setblocking(False)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "admin.sock"))
    unix.listen()
    other = socket.create_server(("127.0.0.1", 0))
    try:
        yield [web, unix, other]
    finally:
        for sock in (web, unix, other):
            sock.close()


def test_shim_hands_sockets_over_as_fd3_onwards_with_listen_pid_of_the_app(
    listeners: list[socket.socket], tmp_path: Path
) -> None:
    web, unix, other = listeners
    env = dict(os.environ, LISTEN_FDS="3", LISTEN_FDNAMES="web::web")
    # Sources inside the target range, in the "wrong" order: the shim must not clobber them.
    command = [sys.executable, "-c", REPORT_SOCKETS]
    status, out = spawn_through_shim({4: web, 3: unix, 9: other}, [4, 3, 9], command, env)
    assert status == 0, out
    report = json.loads(out)
    assert report["seen"]["LISTEN_PID"] == str(report["pid"])  # the pid that exec'd, i.e. the app
    assert report["after"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
    sockets = report["sockets"]
    assert list(sockets) == ["web", "fd4", "web.5"]  # missing name, repeated name
    assert [s["fd"] for s in sockets.values()] == [3, 4, 5]
    assert sockets["web"]["family"] == "AF_INET" and sockets["web"]["type"] == "SOCK_STREAM"
    assert sockets["web"]["address"] == list(web.getsockname())
    assert sockets["fd4"]["family"] == "AF_UNIX"
    assert sockets["fd4"]["address"] == str(tmp_path / "admin.sock")
    assert sockets["web.5"]["address"] == list(other.getsockname())
    assert not any(s["inheritable"] for s in sockets.values())
    # The Python objects mirror the shared fd's O_NONBLOCK flag instead of changing it.
    assert sockets["web"]["blocking"] is False and sockets["fd4"]["blocking"] is True
    assert web.getblocking() is False and unix.getblocking() is True


def test_shim_restores_default_sigpipe_for_the_app() -> None:
    status, out = spawn_through_shim({}, [], ["/bin/grep", "^SigIgn", "/proc/self/status"], dict(os.environ))
    assert status == 0, out
    ignored = int(out.split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), out


def test_shim_reports_a_command_it_cannot_run() -> None:
    name = f"sshfwup-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind("\0" + name)
        notify_socket.settimeout(5)
        status, _ = spawn_through_shim({}, [], ["/nonexistent/app"], dict(os.environ, NOTIFY_SOCKET="@" + name))
        assert status == 127
        assert notify_socket.recv(4096) == b"STATUS=cannot run '/nonexistent/app': No such file or directory"


def test_shim_refuses_a_room_it_cannot_enter(tmp_path: Path) -> None:
    room = '{"uid": null, "gid": null, "groups": [], "caps": [], "cgroup": "/nonexistent/cgroup/app-x"}'
    flag = tmp_path / "ran"
    argv = [sys.executable, "-I", "-S", str(SHIM), "--sshfwup-exec", str(os.getpid()), "", "--room", room,
            "--", "touch", str(flag)]  # fmt: skip
    result = subprocess.run(argv, timeout=10, capture_output=True, text=True)
    assert result.returncode == 126 and "cannot enter its cgroup /nonexistent/cgroup/app-x" in result.stderr
    assert not flag.exists()


def test_shim_refuses_to_run_when_its_parent_is_already_gone(tmp_path: Path) -> None:
    flag = tmp_path / "ran"
    argv = [sys.executable, "-I", "-S", str(SHIM), "--sshfwup-exec", "1", "", "--", "touch", str(flag)]
    assert subprocess.run(argv, timeout=10).returncode == 125
    assert not flag.exists()


def test_shim_ties_the_app_to_its_parent() -> None:
    launcher = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-I', '-S', sys.argv[1], '--sshfwup-exec', str(os.getpid()),"
        " '', '--', 'sleep', '60'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher, str(SHIM)], stdout=subprocess.PIPE, text=True)
    app_pid = 0
    try:
        assert parent.stdout is not None
        app_pid = int(parent.stdout.readline())
        time.sleep(0.2)  # let the shim exec
        assert alive(app_pid)
        parent.kill()
        parent.wait()
        assert wait_gone(app_pid), "the app outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
        if app_pid and alive(app_pid):
            os.kill(app_pid, signal.SIGKILL)


def test_listen_sockets_ignores_variables_meant_for_another_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "a:b")
    assert app.listen_sockets(unset_environment=False) == {}
    assert os.environ["LISTEN_FDS"] == "2"
    assert app.listen_sockets() == {}
    assert not any(v in os.environ for v in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))


# --- sd_notify -----------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_receiver(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    else:
        name = f"sshfwup-test-{secrets.token_hex(6)}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    sock.settimeout(2)
    try:
        yield sock
    finally:
        sock.close()


def test_notify_messages_reach_the_notify_socket(notify_receiver: socket.socket) -> None:
    assert app.notify_ready()
    assert notify_receiver.recv(4096) == b"READY=1"
    assert app.notify_ready(status="serving 2.0.0")
    assert notify_receiver.recv(4096) == b"READY=1\nSTATUS=serving 2.0.0"
    assert app.notify_status("warming up")
    assert notify_receiver.recv(4096) == b"STATUS=warming up"
    assert app.notify_stopping()
    assert notify_receiver.recv(4096) == b"STOPPING=1"


def test_notify_without_a_notify_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert app.notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert app.notify_ready() is False


# --- serve() -------------------------------------------------------------------------------


async def test_serve_finishes_in_flight_work_and_leaves_the_shared_listener_open() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    own_copy = socket.socket(fileno=os.dup(listener.fileno()))  # what an app holds
    stop = asyncio.Event()
    slow_started = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line == b"slow\n":
            slow_started.set()
            await asyncio.sleep(0.4)
        writer.write(b"done " + line)
        await writer.drain()

    try:
        serving = asyncio.create_task(app.serve([own_copy], handle, stop=stop))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"slow\n")
        await asyncio.wait_for(slow_started.wait(), 5)
        stop.set()
        await asyncio.sleep(0.1)
        assert not serving.done(), "serve() returned while a request was in flight"
        assert await asyncio.wait_for(reader.read(), 5) == b"done slow\n"
        writer.close()
        await asyncio.wait_for(serving, 5)
        assert own_copy.fileno() == -1
        # The shared listener still queues connections for the next instance: not refused.
        _, late = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        conn, _ = listener.accept()
        conn.close()
        late.close()
    finally:
        listener.close()
        own_copy.close()


async def test_serve_bounds_the_drain() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    stop = asyncio.Event()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)  # a client that never finishes
        except asyncio.CancelledError:
            cancelled.set()
            raise

    try:
        serving = asyncio.create_task(app.serve([listener], handle, stop=stop, drain_timeout=0.3))
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        await asyncio.wait_for(started.wait(), 5)
        stop.set()
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(serving, 5)
        assert cancelled.is_set() and 0.25 < asyncio.get_running_loop().time() - began < 3
        writer.close()
    finally:
        listener.close()


async def test_two_instances_serving_one_listener_answer_every_connection() -> None:
    """The overlap of a swap: both accept from one queue; EAGAIN races must not lose anything."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    copies = [socket.socket(fileno=os.dup(listener.fileno())) for _ in range(2)]
    stops = [asyncio.Event(), asyncio.Event()]

    def handler(tag: bytes) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(tag)
            await writer.drain()

        return handle

    async def request() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hi\n")
        answer = await reader.read()
        writer.close()
        return answer

    try:
        servers = [
            asyncio.create_task(app.serve([copy], handler(tag), stop=stop))
            for copy, tag, stop in zip(copies, (b"a", b"b"), stops)
        ]
        answers = await asyncio.wait_for(asyncio.gather(*(request() for _ in range(100))), 10)
        stops[0].set()  # one instance stops mid-stream, the other carries on
        answers += await asyncio.wait_for(asyncio.gather(*(request() for _ in range(100))), 10)
        assert len(answers) == 200 and set(answers) <= {b"a", b"b"} and all(answers)
        assert set(answers[100:]) == {b"b"}
        stops[1].set()
        await asyncio.wait_for(asyncio.gather(*servers), 5)
    finally:
        listener.close()
        for c in copies:
            c.close()
