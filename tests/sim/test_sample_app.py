"""The sample app under hand-made socket activation: endpoints, behaviour flags, graceful drain."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sshfwup.sim.rootfs import make_rootfs

# Puts the given fds at 3, 4, ... and sets LISTEN_PID to the pid that execs the app (systemd's way).
SHIM = (
    "import fcntl, os, sys\n"
    "fds = [int(f) for f in sys.argv[1].split(',')]\n"
    "high = [fcntl.fcntl(f, fcntl.F_DUPFD, 100) for f in fds]  # out of the way of 3, 4, ...\n"
    "for i, f in enumerate(high): os.dup2(f, 3 + i, inheritable=True)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
)


@dataclass
class AppProcess:
    process: subprocess.Popen[bytes]
    notify: socket.socket
    messages: list[str] = field(default_factory=list)

    def wait_message(self, wanted: str, timeout: float = 10.0) -> float:
        """Seconds until a notification line equal to ``wanted`` arrives."""
        start = time.monotonic()
        while wanted not in self.messages:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                raise AssertionError(f"no {wanted!r} within {timeout} s; got {self.messages}")
            self.notify.settimeout(left)
            try:
                data = self.notify.recv(4096)
            except TimeoutError:
                continue
            self.messages += data.decode().splitlines()
        return time.monotonic() - start

    def no_message(self, unwanted: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.notify.settimeout(left)
            try:
                self.messages += self.notify.recv(4096).decode().splitlines()
            except TimeoutError:
                break
        assert unwanted not in self.messages


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sapp-", dir="/tmp"))  # unix socket paths must stay short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def start_app(tmp_path: Path, short_dir: Path) -> Iterator[Any]:
    started: list[AppProcess] = []

    def start(
        sockets: Mapping[str, socket.socket],
        *,
        version: str = "1.0.0",
        slot: str = "a",
        behavior: Mapping[str, Any] | None = None,
        listen: bool = True,
    ) -> AppProcess:
        app_dir = make_rootfs(tmp_path / f"rootfs-{len(started)}", version=version, app_behavior=behavior) / "srv/app"
        notify_path = short_dir / f"notify-{len(started)}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "SSHFWUP_SLOT": slot}
        fds = [s.fileno() for s in sockets.values()]
        if listen:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(sockets))
            argv = [sys.executable, "-c", SHIM, ",".join(map(str, fds)), str(app_dir / "app.py")]
        else:
            for name in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
                env.pop(name, None)
            argv = [sys.executable, str(app_dir / "app.py")]
        process = subprocess.Popen(argv, env=env, pass_fds=fds, stderr=subprocess.PIPE)
        app = AppProcess(process, notify)
        started.append(app)
        return app

    try:
        yield start
    finally:
        for app in started:
            if app.process.poll() is None:
                app.process.kill()
            app.process.wait()
            if app.process.stderr:
                app.process.stderr.close()
            app.notify.close()


def get(sock: socket.socket, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    host, port = sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_serves_identity_and_health_with_keep_alive(listener: socket.socket, start_app: Any) -> None:
    app = start_app({"http": listener}, version="1.2.3", slot="b")
    app.wait_message("READY=1")
    host, port = listener.getsockname()
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/")
        first = conn.getresponse()
        body = json.loads(first.read())
        assert first.status == 200 and first.getheader("Connection") == "keep-alive"
        assert body == {"version": "1.2.3", "slot": "b", "pid": app.process.pid}
        local = conn.sock.getsockname()
        conn.request("GET", "/health")
        health = conn.getresponse()
        assert (health.status, health.read()) == (200, b"ok\n")
        assert conn.sock.getsockname() == local  # the same connection: keep-alive works
        conn.request("GET", "/nope")
        missing = conn.getresponse()
        assert missing.status == 404
        missing.read()
    finally:
        conn.close()
    assert any(m.startswith("STATUS=serving version 1.2.3") for m in app.messages)


def test_http_1_0_without_keep_alive_is_closed(listener: socket.socket, start_app: Any) -> None:
    app = start_app({"http": listener})
    app.wait_message("READY=1")
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := client.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in data


def test_serves_every_inherited_socket_including_health(listener: socket.socket, start_app: Any) -> None:
    health = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    health.bind(("127.0.0.1", 0))
    health.listen(8)
    try:
        app = start_app({"http": listener, "health": health})
        app.wait_message("READY=1")
        assert get(health, "/health")[0] == 200
        assert json.loads(get(listener, "/")[2])["pid"] == app.process.pid
    finally:
        health.close()


def test_ready_delay_holds_back_ready(listener: socket.socket, start_app: Any) -> None:
    app = start_app({"http": listener}, behavior={"ready_delay": 0.6})
    assert app.wait_message("READY=1") >= 0.5


def test_never_ready_never_says_ready_nor_answers(listener: socket.socket, start_app: Any) -> None:
    app = start_app({"http": listener}, behavior={"never_ready": True, "ready_delay": 0})
    app.no_message("READY=1", 1.0)
    with pytest.raises(TimeoutError):
        get(listener, "/health", timeout=0.5)
    app.process.send_signal(signal.SIGTERM)
    assert app.process.wait(5) == 0


def test_crash_after_exits_with_status_3(listener: socket.socket, start_app: Any) -> None:
    app = start_app({"http": listener}, behavior={"crash_after": 0.3})
    app.wait_message("READY=1")
    assert get(listener, "/")[0] == 200
    assert app.process.wait(5) == 3


def test_unhealthy_after_turns_health_to_500(listener: socket.socket, start_app: Any) -> None:
    app = start_app({"http": listener}, behavior={"unhealthy_after": 0.5})
    app.wait_message("READY=1")
    assert get(listener, "/health")[0] == 200
    time.sleep(0.6)
    assert get(listener, "/health")[0] == 500
    assert get(listener, "/")[0] == 200  # still serving, just unhealthy


def test_without_sockets_it_says_why(start_app: Any) -> None:
    app = start_app({}, listen=False)
    assert app.process.wait(10) == 2
    assert b"no listening sockets" in app.process.stderr.read()


def test_sigterm_drains_while_a_second_instance_serves_the_same_socket(
    listener: socket.socket, start_app: Any
) -> None:
    old = start_app({"http": listener}, version="1.0.0", slot="a")
    old.wait_message("READY=1")

    idle = http.client.HTTPConnection(*listener.getsockname(), timeout=5)
    idle.request("GET", "/")
    assert json.loads(idle.getresponse().read())["version"] == "1.0.0"  # now idle, kept alive

    slow_result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            slow_result["response"] = get(listener, "/slow?seconds=1.5", timeout=10)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            slow_result["error"] = e

    slow = threading.Thread(target=slow_request)
    slow.start()
    time.sleep(0.3)  # accepted by the old instance, the only one serving

    new = start_app({"http": listener}, version="2.0.0", slot="b")
    new.wait_message("READY=1")
    old.process.send_signal(signal.SIGTERM)
    old.wait_message("STOPPING=1")

    # new connections go to the new instance while the old one finishes its request
    versions = [json.loads(get(listener, "/")[2])["version"] for _ in range(20)]
    assert versions == ["2.0.0"] * 20
    assert old.process.poll() is None  # still draining

    assert idle.sock.recv(1) == b""  # the idle keep-alive connection was closed
    idle.close()

    slow.join(10)
    assert "error" not in slow_result, slow_result
    status, headers, body = slow_result["response"]
    assert status == 200 and headers["connection"] == "close"
    assert json.loads(body)["version"] == "1.0.0"
    assert old.process.wait(5) == 0

    assert json.loads(get(listener, "/")[2])["version"] == "2.0.0"
    new.process.send_signal(signal.SIGTERM)
    assert new.process.wait(5) == 0


def test_connection_accepted_before_sigterm_still_gets_its_first_request_answered(
    listener: socket.socket, start_app: Any
) -> None:
    app = start_app({"http": listener})
    app.wait_message("READY=1")
    early = socket.create_connection(listener.getsockname(), timeout=5)
    silent = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        time.sleep(0.3)  # both accepted by the app, neither has sent a request
        app.process.send_signal(signal.SIGTERM)
        app.wait_message("STOPPING=1")
        early.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := early.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in reply
        # the silent one is closed after a grace period, and the app exits
        assert silent.recv(1) == b""
        assert app.process.wait(5) == 0
    finally:
        early.close()
        silent.close()
