"""A small HTTP/1.1 app for the supervisor tests, built on sshfwup.app.

It serves every socket it is given (the shared ones and the private ``health`` one):

- ``GET /``           200, body ``"<VERSION> <pid>"`` (VERSION is read from the app directory)
- ``GET /slow?S``     the same after sleeping S seconds (an in-flight request for drain tests)
- ``GET /health``     200, or 500 once ``health_fail_after`` seconds passed since it became ready
- ``GET /info``       JSON: what the process saw at start (LISTEN_*, fds, cwd, sys.path, ...)

Its behaviour comes from ``mode.json`` in the app directory, so two "firmware versions" of the
app differ the way real ones would: ``ready`` ("notify" | "never": never serves nor notifies),
``startup_delay``, ``exit_after`` [seconds, status], ``health_fail_after``, ``ignore_sigterm``,
``leave_behind`` (seconds: start a helper in a session of its own that ignores SIGTERM and
outlives this process by that long, like a multiprocessing resource tracker; event ``left PID``),
``own_port`` (serve a port of its own instead of the public sockets — the private ``health`` one
still — and say ready all the same), ``stop_accepting_after`` (seconds after ready: stop accepting
on every socket, stay alive until SIGTERM; event ``stopped accepting``).
Every event is appended to the file named by ``APP_EVENTS`` as ``<pid> <event>``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

from sshfwup import app

PID = os.getpid()
SEEN_AT_START = {
    "pid": PID,
    "LISTEN_PID": os.environ.get("LISTEN_PID"),
    "LISTEN_FDS": os.environ.get("LISTEN_FDS"),
    "LISTEN_FDNAMES": os.environ.get("LISTEN_FDNAMES"),
    "NOTIFY_SOCKET": os.environ.get("NOTIFY_SOCKET"),
    "cwd": os.getcwd(),
    "sys_path": sys.path[:3],
    "env": {k: v for k, v in os.environ.items() if k.startswith(("SSHFWUP_", "APP_", "SIM_"))},
}
MODE = json.loads(Path("mode.json").read_text()) if Path("mode.json").exists() else {}
VERSION = Path("VERSION").read_text().strip() if Path("VERSION").exists() else "unknown"


def event(text: str) -> None:
    path = os.environ.get("APP_EVENTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{PID} {text}\n")


def leave_behind(seconds: float) -> None:
    import subprocess

    code = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"while os.getppid() == {PID}:\n"
        "    time.sleep(0.02)\n"
        f"time.sleep({seconds})\n"
    )
    helper = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    event(f"left {helper.pid}")


class App:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.stop_accepting = self.stop
        self.ready_at: float | None = None

    def health_ok(self) -> bool:
        fail_after = MODE.get("health_fail_after")
        loop = asyncio.get_running_loop()
        return fail_after is None or self.ready_at is None or loop.time() - self.ready_at < fail_after

    async def respond(self, target: str) -> tuple[int, str, str]:
        path, _, query = target.partition("?")
        if path == "/health":
            event("health")
            return (200, "ok", "text/plain") if self.health_ok() else (500, "unhealthy", "text/plain")
        if path == "/info":
            return 200, json.dumps(SEEN_AT_START | {"sockets": self.sockets}), "application/json"
        if path == "/slow":
            event("slow-begin")
            await asyncio.sleep(float(query or "1"))
            event("slow-end")
        if path in ("/", "/slow"):
            return 200, f"{VERSION} {PID}", "text/plain"
        return 404, "not found", "text/plain"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request_line = await self.next_request_line(reader)
            if not request_line:
                return
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip().lower()
            method, target, version = request_line.decode("latin-1").split()
            status, body, content_type = await self.respond(target)
            keep_alive = version == "HTTP/1.1" and headers.get("connection") != "close" and not self.stop.is_set()
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                f"X-Pid: {PID}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode() + data
            )
            await writer.drain()
            if not keep_alive:
                return

    async def next_request_line(self, reader: asyncio.StreamReader) -> bytes:
        """The next request on a connection; once draining, an idle connection gets a short grace
        (a keep-alive client sends its next request and is told ``Connection: close``)."""
        read = asyncio.ensure_future(reader.readline())
        stopping = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if read.done():
            return read.result()
        try:
            return await asyncio.wait_for(read, 1.0)
        except (asyncio.TimeoutError, ConnectionError):
            return b""

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        event("start")
        if "leave_behind" in MODE:
            leave_behind(float(MODE["leave_behind"]))

        def on_sigterm() -> None:
            event("sigterm")
            if not MODE.get("ignore_sigterm"):
                app.notify_stopping()
                self.stop.set()
                self.stop_accepting.set()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        sockets = app.listen_sockets()
        self.sockets = [
            {"name": name, "fd": s.fileno(), "family": s.family.name, "type": s.type.name}
            for name, s in sockets.items()
        ]
        self.sockets_env_after = {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
        SEEN_AT_START["env_after_listen_sockets"] = self.sockets_env_after
        if MODE.get("ready") == "never":
            await self.stop.wait()
            event("exit")
            return
        try:  # a slow start that SIGTERM can cut short
            await asyncio.wait_for(self.stop.wait(), MODE.get("startup_delay", 0))
            event("exit")
            return
        except asyncio.TimeoutError:
            pass
        if MODE.get("own_port"):
            own = socket.create_server(("127.0.0.1", 0))
            own.setblocking(False)
            sockets = {"own": own, **{name: s for name, s in sockets.items() if name == "health"}}
            event(f"own port {own.getsockname()[1]}")
        accepting = self.stop
        if "stop_accepting_after" in MODE:
            accepting = asyncio.Event()
            loop.call_later(MODE["stop_accepting_after"], accepting.set)
            self.stop_accepting = accepting
        serving = asyncio.ensure_future(app.serve(sockets.values(), self.handle, stop=accepting))
        self.ready_at = loop.time()
        app.notify_ready(status=f"{VERSION} serving")
        event("ready")
        if "exit_after" in MODE:
            seconds, status = MODE["exit_after"]
            await asyncio.sleep(seconds)
            event(f"exit {status}")
            os._exit(status)
        await serving
        if not self.stop.is_set():
            event("stopped accepting")
            await self.stop.wait()
        event("exit")


if __name__ == "__main__":
    asyncio.run(App().main())
