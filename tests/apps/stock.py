"""Stock servers under the supervisor, for tests/supervisor/test_stock_servers.py and bench/stock_servers.py.

Two "firmware versions" of a tiny app (``asgi_app.py``, ``wsgi_app.py``, or the sample app),
each in a fake root filesystem of its own (``ROOT/srv/app``), run by gunicorn, uvicorn,
hypercorn or plain Python — with the no-code-change configurations of docs/hot-reload-apps.md.
The servers are the ones the test extra installs from PyPI into this venv, called by absolute
path: the supervisor looks a bare ``gunicorn`` up on its own PATH, not the app's.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from sshfwup.supervisor import listeners
from sshfwup.config import AppConfig, SocketSpec
from sshfwup.sim.loadgen import LoadSpec
from sshfwup.supervisor.supervisor import AppSource

VENV_BIN = Path(sys.executable).parent
APPS = Path(__file__).resolve().parent
SAMPLE_APP = Path(__file__).resolve().parents[2] / "sshfwup" / "sim" / "sample_app" / "app.py"


@dataclass(frozen=True)
class StockServer:
    name: str
    app_file: Path  # copied into the app directory of each version
    command: tuple[str, ...]
    # True: ready = "http", which needs nothing from the app where the socket is steered
    # (reuseport); on the shared path such a server needs ready = "notify" and the app's
    # notify_ready() (APP_NOTIFY_READY=1 for asgi_app.py).
    http_ready: bool
    drain_timeout: float = 35.0

    def missing(self) -> str | None:
        """Why this server cannot run here, or None."""
        executable = Path(self.command[0])
        if executable.is_absolute() and not executable.exists():
            return f"{executable} is missing: run scripts/bootstrap.sh (the test extra installs {self.name})"
        return None

    def install(self, base: Path, slot: str, version: str, *, broken: bool = False) -> AppSource:
        root = base / f"rootfs-{self.name}-{slot}-{version}"
        app_dir = root / "srv" / "app"
        app_dir.mkdir(parents=True)
        shutil.copy(self.app_file, app_dir / self.app_file.name)
        (app_dir / "VERSION").write_text(version)
        if broken:
            (app_dir / "BROKEN").write_text("a release whose import fails\n")
        return AppSource(root, slot, version)

    def ready(self, *, steered: bool) -> str:
        return "http" if self.http_ready and steered else "notify"

    def config(self, *, steered: bool, host: str = "127.0.0.1", port: int = 0, **overrides: Any) -> AppConfig:
        ready = self.ready(steered=steered)
        config = AppConfig(
            command=self.command,
            app_dir="/srv/app",
            env=(("APP_NOTIFY_READY", "1"),) if ready == "notify" else (),
            sockets=(SocketSpec("tcp", host, port, "http"),),
            ready=ready,  # type: ignore[arg-type]
            ready_timeout=30.0,
            drain_timeout=self.drain_timeout,
            observe=1.0,
            health_interval=0.5,
            user="",  # the test venv's servers live under root-only paths; the room is tested in test_room.py
        )
        return replace(config, **overrides)


SERVERS = {
    server.name: server
    for server in (
        StockServer(
            "gunicorn",
            APPS / "wsgi_app.py",
            (str(VENV_BIN / "gunicorn"), "--preload", "--no-control-socket", "--workers", "2",
             "wsgi_app:application"),  # fmt: skip
            http_ready=False,  # gunicorn sends READY=1 itself (after importing the app: --preload)
        ),
        StockServer(
            "uvicorn",
            APPS / "asgi_app.py",
            (str(VENV_BIN / "uvicorn"), "--fd", "3", "--no-access-log", "asgi_app:app"),
            http_ready=True,
        ),
        StockServer(
            "hypercorn",
            APPS / "asgi_app.py",
            (str(VENV_BIN / "hypercorn"), "--bind", "fd://3", "--graceful-timeout", "30", "asgi_app:app"),
            http_ready=True,
        ),
        StockServer("sample", SAMPLE_APP, (sys.executable, "{app_dir}/app.py"), http_ready=False),
    )
}


def sync_workers(server: StockServer, workers: int) -> StockServer:
    """gunicorn with ``workers`` sync workers: each one takes one connection at a time and closes
    it after the response (its sync worker has no keep-alive), so more clients than workers keep
    every worker busy and the others' connections waiting in the accept queue."""
    if server.name != "gunicorn":
        raise ValueError(f"{server.name} has no sync workers")
    command = list(server.command)
    command[command.index("--workers") + 1] = str(workers)
    return replace(server, command=tuple(command))


def expected_socket_path() -> str:
    """What a swap of one TCP socket reports on this kernel with steering on."""
    return "reuseport+migrate" if listeners.migration_enabled() else "reuseport"


def unthrottled(url: str, *, concurrency: int, keepalive: bool) -> LoadSpec:
    """hey as fast as it goes: its ticker at 10 µs per worker is far below one request's time."""
    return LoadSpec(url, rate=100_000.0 * concurrency, concurrency=concurrency, keepalive=keepalive)


async def fresh_requests(port: int, into: list[tuple[float, str]], running: list[bool]) -> None:
    """A new connection per request, one after the other, while ``running[0]``: appends (request
    start, version that answered) — the first word of the body."""
    from httpload import get  # tests/ is on sys.path wherever this runs

    while running[0]:
        began = time.monotonic()
        response = await get(port)
        into.append((began, response.body.split()[0]))
        await anyio.sleep(0.005)


def answers_between(answers: list[tuple[float, str]], start: float, end: float) -> set[str]:
    return {version for began, version in answers if start < began < end}
