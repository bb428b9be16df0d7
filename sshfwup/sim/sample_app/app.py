"""sshfwup's sample application: a small HTTP/1.1 server that swaps without dropping a request.

It serves on the listening sockets it inherits (systemd's LISTEN_FDS convention, via
``sshfwup.app``), so two instances — the old and the new version — can serve the same socket
during a hot swap. Endpoints:

- ``GET /``             → ``{"version": ..., "slot": ..., "pid": ...}`` (JSON)
- ``GET /health``       → 200 ``ok`` once ready (500 once ``unhealthy_after`` has passed)
- ``GET /slow?seconds=S`` → like ``/`` after S seconds (at most 60): an in-flight request to drain

Behaviour comes from ``behavior.json`` next to this file:

- ``ready_delay`` (seconds, default 0.1): start-up time before accepting and sending READY=1
- ``never_ready``: start up forever: never accept a connection, never send READY=1
- ``crash_after`` (seconds): exit with status 3 this long after becoming ready
- ``unhealthy_after`` (seconds): ``/health`` answers 500 from this long after becoming ready
- ``stop_accepting_after`` (seconds): this long after becoming ready, stop accepting new
  connections (its copies of the listeners closed, as a dead accept loop would) and hang on,
  alive and serving the connections it has, until SIGTERM
- ``own_port``: ignore the sockets it is given and serve a port of its own (127.0.0.1, any
  port), yet send READY=1: the broken release whose public port hangs

On SIGTERM (or SIGINT) it drains: STOPPING=1, closes its own listening socket objects (the
listener itself stays open in the supervisor and any other instance; never ``shutdown()`` a
shared listener), answers requests already in flight with ``Connection: close``, closes idle
keep-alive connections, and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sshfwup.app import listen_sockets, notify_ready, notify_stopping, serve

log = logging.getLogger("sample-app")

HERE = Path(__file__).resolve().parent
MAX_HEADER_LINES = 100
MAX_BODY = 1024 * 1024
MAX_SLOW = 60.0
# While draining, a connection accepted just before the listener closed may still be sending its
# first request: it gets this long before it is closed unanswered.
FIRST_REQUEST_GRACE = 2.0

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
           503: "Service Unavailable"}


class BadRequest(Exception):
    pass


def _load_behavior() -> dict[str, Any]:
    try:
        behavior = json.loads((HERE / "behavior.json").read_text())
    except FileNotFoundError:
        return {}
    if not isinstance(behavior, dict):
        raise SystemExit(f"{HERE / 'behavior.json'}: expected a JSON object")
    return behavior


def _read_version() -> str:
    try:
        return (HERE / "VERSION").read_text().strip()
    except FileNotFoundError:
        return "unknown"


class Connection:
    """One client connection: ``new`` (no request yet), ``busy`` (a request in flight) or ``idle``
    (kept alive between requests)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.state = "new"


class SampleApp:
    def __init__(self, behavior: dict[str, Any]) -> None:
        self.behavior = behavior
        self.version = _read_version()
        self.slot = os.environ.get("SSHFWUP_SLOT")
        self.ready_at: float | None = None
        self.draining = False
        self.stop = asyncio.Event()
        self.connections: set[Connection] = set()

    # --- requests

    def healthy(self) -> bool:
        if self.ready_at is None or self.draining:
            return False
        after = self.behavior.get("unhealthy_after")
        return after is None or time.monotonic() - self.ready_at < float(after)

    def identity(self) -> bytes:
        return json.dumps({"version": self.version, "slot": self.slot, "pid": os.getpid()}).encode()

    async def respond(self, method: str, target: str) -> tuple[int, bytes, str]:
        url = urlsplit(target)
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if url.path == "/":
            return 200, self.identity(), "application/json"
        if url.path == "/health":
            if self.healthy():
                return 200, b"ok\n", "text/plain"
            return (503 if self.ready_at is None else 500), b"unhealthy\n", "text/plain"
        if url.path == "/slow":
            try:
                seconds = float(parse_qs(url.query).get("seconds", ["1"])[0])
            except ValueError:
                return 400, b"seconds must be a number\n", "text/plain"
            await asyncio.sleep(min(max(seconds, 0.0), MAX_SLOW))
            return 200, self.identity(), "application/json"
        return 404, b"not found\n", "text/plain"

    async def read_request(self, reader: asyncio.StreamReader, first: bytes) -> tuple[str, str, str, dict[str, str]]:
        try:
            method, target, version = first.decode("latin-1").split()
        except ValueError:
            raise BadRequest("malformed request line") from None
        if not version.startswith("HTTP/1."):
            raise BadRequest("unsupported protocol")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readline()
            if not line:
                raise BadRequest("connection closed inside the headers")
            if line in (b"\r\n", b"\n"):
                break
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise BadRequest("malformed header")
            headers[name.strip().lower()] = value.strip()
        else:
            raise BadRequest("too many headers")
        length = int(headers.get("content-length", "0") or "0")
        if not 0 <= length <= MAX_BODY:
            raise BadRequest("bad content length")
        if length:
            await reader.readexactly(length)  # bodies are accepted and ignored
        return method, target, version, headers

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self.connections.add(conn)
        if self.draining:
            self._close_if_new_later(conn)
        try:
            while conn.state == "new" or not self.draining:
                first = await reader.readline()  # new or idle: waiting for the next request
                if not first:
                    break
                conn.state = "busy"
                keep_alive = False
                try:
                    method, target, version, headers = await self.read_request(reader, first)
                    status, body, content_type = await self.respond(method, target)
                    connection = headers.get("connection", "").lower()
                    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
                except BadRequest as e:
                    method, status, body, content_type = "GET", 400, f"{e}\n".encode(), "text/plain"
                keep_alive = keep_alive and not self.draining
                head = (
                    f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
                ).encode("latin-1")
                writer.write(head if method == "HEAD" else head + body)
                await writer.drain()
                if not keep_alive:
                    break
                conn.state = "idle"
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self.connections.discard(conn)
            writer.close()

    # --- life cycle

    def _close_if_new_later(self, conn: Connection) -> None:
        def close() -> None:
            if conn.state == "new":
                conn.writer.close()

        asyncio.get_running_loop().call_later(FIRST_REQUEST_GRACE, close)

    def drain(self) -> None:
        """Stop accepting and let in-flight requests finish; idle connections are closed."""
        if self.draining:
            return
        self.draining = True
        notify_stopping()
        self.stop.set()  # serve() closes our copies of the listeners; never shutdown()
        for conn in list(self.connections):
            if conn.state == "idle":
                conn.writer.close()
            elif conn.state == "new":
                self._close_if_new_later(conn)
        log.info("draining %d connection(s)", len(self.connections))

    async def crash_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.error("crashing on purpose (crash_after=%s)", seconds)
        sys.stderr.flush()
        os._exit(3)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        sockets = listen_sockets()
        if not sockets:
            log.error("no listening sockets: start me under sshfwup (LISTEN_FDS is not set)")
            return 2

        try:  # start-up work; connections wait in the listen queue (or go to another instance)
            await asyncio.wait_for(self.stop.wait(), float(self.behavior.get("ready_delay", 0.1)))
        except asyncio.TimeoutError:
            pass
        if self.behavior.get("never_ready"):
            log.warning("never_ready: starting up forever")
            await self.stop.wait()
            return 0
        if self.stop.is_set():
            return 0

        if self.behavior.get("own_port"):
            own = socket.create_server(("127.0.0.1", 0))
            own.setblocking(False)
            log.warning("own_port: ignoring the sockets I was given; serving port %d", own.getsockname()[1])
            sockets = {"own": own}
        self.ready_at = time.monotonic()
        notify_ready(f"serving version {self.version} from slot {self.slot}")
        log.info("version %s (slot %s) ready on %s", self.version, self.slot, ", ".join(sockets))
        crash_after = self.behavior.get("crash_after")
        crash = asyncio.create_task(self.crash_later(float(crash_after))) if crash_after is not None else None
        accepting, stopper = self.stop, None
        stop_accepting_after = self.behavior.get("stop_accepting_after")
        if stop_accepting_after is not None:
            accepting = asyncio.Event()
            stopper = asyncio.create_task(self.stop_accepting_later(float(stop_accepting_after), accepting))
        try:
            await serve(sockets.values(), self.handle, stop=accepting)  # returns once drained
            if not self.stop.is_set():
                log.warning("stopped accepting (stop_accepting_after=%s); hanging on until SIGTERM", stop_accepting_after)
                await self.stop.wait()
        finally:
            for task in (crash, stopper):
                if task is not None:
                    task.cancel()
        log.info("drained; exiting")
        return 0

    async def stop_accepting_later(self, seconds: float, accepting: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        accepting.set()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"sample-app[{os.getpid()}] %(levelname)s %(message)s"
    )
    return asyncio.run(SampleApp(_load_behavior()).run())


if __name__ == "__main__":
    sys.exit(main())
