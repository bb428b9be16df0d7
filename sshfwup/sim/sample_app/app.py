"""sshfwup's sample application: a small HTTP/1.1 server that swaps without dropping a request.

It serves on the listening sockets it inherits (systemd's LISTEN_FDS convention, via
``sshfwup.app``), so two instances — the old and the new version — can serve the same socket
during a hot swap. Endpoints:

- ``GET /``             → ``{"version": ..., "slot": ..., "pid": ...}`` (JSON)
- ``GET /health``       → 200 ``ok`` once ready (500 once ``unhealthy_after`` has passed)
- ``GET /slow?seconds=S`` → like ``/`` after S seconds (at most 60): an in-flight request to drain
- ``GET /count``        → ``{"count": N, "version": ...}``: an in-memory counter, one up per request
- ``GET /stream?interval=S`` → a never-ending ``text/plain`` stream, one line ``"<seq> <version>\n"``
  every S seconds (default 0.05), seq counting from 0: a long-lived connection

With ``[app] handoff = true`` (:mod:`sshfwup.app.handoff`) the counter and the streams move to the
new version during a swap: the old version, asked, pauses (its event loop blocks in
``handoff.send``), hands over ``{"count", "streams": [{"next", "pending"}...]}`` as state
version 1 with the stream connections, and once the new version is ready closes its copies;
each stream goes on with the next line, neither lost nor repeated. Without hand-off (or when
the new version refuses), streams end when the old version drains.

Behaviour comes from ``behavior.json`` next to this file:

- ``ready_delay`` (seconds, default 0.1): start-up time before accepting and sending READY=1
- ``never_ready``: start up forever: never accept a connection, never send READY=1
- ``crash_after`` (seconds): exit with status 3 this long after becoming ready
- ``fail_at_start`` (text): log it as an error and exit with status 1 before becoming ready, as
  a release that cannot start does (a missing module, an unreadable file): it never serves
- ``unhealthy_after`` (seconds): ``/health`` answers 500 from this long after becoming ready
- ``stop_accepting_after`` (seconds): this long after becoming ready, stop accepting new
  connections (its copies of the listeners closed, as a dead accept loop would) and hang on,
  alive and serving the connections it has, until SIGTERM
- ``own_port``: ignore the sockets it is given and serve a port of its own (127.0.0.1, any
  port), yet send READY=1: the broken release whose public port hangs
- ``handoff_accept`` (list of state versions, default ``[1]``): what this version takes over
- ``handoff_die``: asked to hand off, send the start of it and exit (status 4): the old version
  dying mid-hand-off
- ``state_padding`` (bytes): extra state to hand over (for measuring)
- ``handoff_ignore``: never ask for a hand-off at start-up (an app that does not speak it yet)

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

from sshfwup.app import handoff, listen_sockets, notify_ready, notify_stopping, serve

log = logging.getLogger("sample-app")

HERE = Path(__file__).resolve().parent
MAX_HEADER_LINES = 100
MAX_BODY = 1024 * 1024
MAX_SLOW = 60.0
STATE_VERSION = 1  # the hand-off state's format: {"count", "streams": [{"next", "pending"}...]}
STREAM_INTERVAL = (0.005, 10.0)  # bounds of /stream?interval=
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


class Stream:
    """One /stream connection, on a socket of its own (a dup of the accepted one): ``pending``
    holds the bytes not yet taken by the kernel, ``next`` the next sequence number. Both are
    consistent whenever the event loop runs something else — which is when a hand-off happens."""

    def __init__(self, sock: socket.socket, next_seq: int, pending: bytes, interval: float) -> None:
        self.sock = sock
        self.next = next_seq
        self.pending = pending
        self.interval = interval
        self.task: asyncio.Task[None] | None = None
        self.handed_over = False

    def state(self) -> dict[str, Any]:
        return {"next": self.next, "pending": self.pending.decode("latin-1"), "interval": self.interval}


class SampleApp:
    def __init__(self, behavior: dict[str, Any]) -> None:
        self.behavior = behavior
        self.version = _read_version()
        self.slot = os.environ.get("SSHFWUP_SLOT")
        self.ready_at: float | None = None
        self.draining = False
        self.stop = asyncio.Event()
        self.connections: set[Connection] = set()
        self.count = 0
        self.streams: set[Stream] = set()
        self.handed_over = False  # the counter and streams belong to the next version now

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
        if url.path == "/count":
            if self.handed_over:
                return 503, b"the counter moved to the next version\n", "text/plain"
            self.count += 1
            return 200, json.dumps({"count": self.count, "version": self.version}).encode(), "application/json"
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
                    if urlsplit(target).path == "/stream" and method == "GET" and not self.draining:
                        self.start_stream(writer, target)
                        return
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

    # --- streams and their hand-off

    def start_stream(self, writer: asyncio.StreamWriter, target: str) -> None:
        """Go on with the connection on a socket of our own; the stream handler returns, and
        closing its transport closes only the original fd (the dup keeps the connection)."""
        try:
            interval = float(parse_qs(urlsplit(target).query).get("interval", ["0.05"])[0])
        except ValueError:
            interval = 0.05
        interval = min(max(interval, STREAM_INTERVAL[0]), STREAM_INTERVAL[1])
        original = writer.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(original.fileno()))
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
        self.run_stream(Stream(sock, 0, head, interval))

    def run_stream(self, stream: Stream) -> None:
        stream.sock.setblocking(False)
        self.streams.add(stream)
        stream.task = asyncio.get_running_loop().create_task(self.stream(stream))

    async def stream(self, s: Stream) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while s.pending:
                    try:
                        sent = s.sock.send(s.pending)
                    except BlockingIOError:
                        ready = loop.create_future()
                        loop.add_writer(s.sock.fileno(), ready.set_result, None)
                        try:
                            await ready
                        finally:
                            loop.remove_writer(s.sock.fileno())
                        continue
                    s.pending = s.pending[sent:]
                await asyncio.sleep(s.interval)
                s.pending = f"{s.next} {self.version}\n".encode()
                s.next += 1
        except OSError:
            pass  # the client went away
        finally:
            self.streams.discard(s)
            s.sock.close()  # our copy; after a hand-over the next version holds its own

    def on_handoff_asked(self) -> None:
        """The supervisor asks for our state and connections (the channel is readable)."""
        if not handoff.asked() or self.handed_over:
            return
        streams = list(self.streams)
        state = {"count": self.count, "streams": [s.state() for s in streams]}
        if self.behavior.get("state_padding"):
            state["padding"] = "x" * int(self.behavior["state_padding"])
        blob = json.dumps(state).encode()
        if self.behavior.get("handoff_die"):
            handoff.send_message(handoff.channel(), handoff.pack_head(STATE_VERSION, len(blob), len(streams)))
            log.error("dying in the middle of the hand-off (handoff_die)")
            sys.stderr.flush()
            os._exit(4)
        # Blocks this event loop until the new version is ready (or gave up): nothing changes
        # the counter or touches a stream meanwhile.
        if handoff.send(STATE_VERSION, blob, [s.sock for s in streams]):
            self.handed_over = True
            for s in streams:
                s.handed_over = True
                if s.task is not None:
                    s.task.cancel()  # closes our copy: no FIN, the next version holds the connection
            log.info("handed over count=%d and %d stream(s)", self.count, len(streams))
        else:
            log.warning("hand-off not taken; the counter and %d stream(s) stay here", len(streams))

    @staticmethod
    def code_change(
        version: int, blob: bytes, sockets: list[socket.socket]
    ) -> tuple[int, list[tuple[int, bytes, float]]]:
        """State version 1 → ours; raises (refusing the hand-off) on anything else."""
        state = json.loads(blob)
        low, high = STREAM_INTERVAL
        streams = [(int(s["next"]), str(s["pending"]).encode("latin-1"), min(max(float(s["interval"]), low), high))
                   for s in state["streams"]]  # fmt: skip
        if len(streams) != len(sockets):
            raise ValueError(f"{len(streams)} streams described for {len(sockets)} sockets")
        return int(state["count"]), streams

    def take_over(self) -> None:
        """At start-up, before READY=1: the previous version's counter and streams, if it hands
        them over in a format we understand."""
        accept = set(self.behavior.get("handoff_accept", [STATE_VERSION]))
        received = handoff.receive(accept, upgrade=self.code_change)
        if received is None:
            return
        count, streams = received.value
        self.count = count
        for sock, (next_seq, pending, interval) in zip(received.sockets, streams):
            self.run_stream(Stream(sock, next_seq, pending, interval))
        log.info("took over count=%d and %d stream(s)", count, len(streams))

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
        for stream in list(self.streams):  # long-lived: end them now (handed over ones are gone)
            if stream.task is not None:
                stream.task.cancel()
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
        if self.behavior.get("fail_at_start"):
            log.error("cannot start: %s", self.behavior["fail_at_start"])
            return 1
        if self.behavior.get("never_ready"):
            log.warning("never_ready: starting up forever")
            await self.stop.wait()
            return 0
        if self.stop.is_set():
            return 0
        if handoff.available():
            if not self.behavior.get("handoff_ignore"):
                self.take_over()
            loop.add_reader(handoff.fileno(), self.on_handoff_asked)

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
        ending = [stream.task for stream in self.streams if stream.task is not None]
        if ending:  # cancelled by drain(): each closes its socket
            await asyncio.gather(*ending, return_exceptions=True)
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
