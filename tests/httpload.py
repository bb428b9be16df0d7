"""A steady HTTP client for zero-downtime tests: every failed or refused request is recorded."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import anyio


@dataclass
class Response:
    status: int
    body: str
    headers: dict[str, str]


async def read_response(reader: asyncio.StreamReader) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Response(status, body.decode(), headers)


async def get(port: int, path: str = "/", *, unix: str | None = None, timeout: float = 5.0) -> Response:
    async def fetch() -> Response:
        if unix:
            reader, writer = await asyncio.open_unix_connection(unix)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
            return await read_response(reader)
        finally:
            writer.close()

    return await asyncio.wait_for(fetch(), timeout)


@dataclass
class Load:
    """A steady client: keep-alive connections plus a fresh connection per request, ~200 req/s."""

    port: int
    answers: list[tuple[float, str]] = field(default_factory=list)  # (request start, version)
    failures: list[str] = field(default_factory=list)
    retried: int = 0  # stale keep-alive connections retried on a new one, like any HTTP client
    running: bool = True

    async def keep_alive(self) -> None:
        reader = writer = None
        reused = False
        while self.running:
            began = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    reused = False
                assert reader is not None
                writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                response = await asyncio.wait_for(read_response(reader), 5)
                self.record(began, response)
                reused = True
                if response.headers.get("connection") == "close":
                    writer.close()  # the server drains this connection: a new one goes to whoever accepts
                    reader = writer = None
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
                if writer is not None:
                    writer.close()
                reader = writer = None
                # (a reset instead of a FIN: the server closed the idle connection with our request unread)
                if reused and not getattr(e, "partial", b""):
                    # An idle keep-alive connection closed by a draining server just as we sent:
                    # no byte of a response came back, so the request was never processed. HTTP
                    # clients retry this transparently (RFC 9112 section 9.3.1); so do we, once.
                    self.retried += 1
                    try:
                        self.record(began, await get(self.port))
                    except Exception as e2:
                        self.failures.append(f"keep-alive retry: {e2!r}")
                else:
                    self.failures.append(f"keep-alive: {e!r}")
            except Exception as e:  # every other error is a failed request
                self.failures.append(f"keep-alive: {e!r}")
                if writer is not None:
                    writer.close()
                reader = writer = None
            await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    async def fresh(self) -> None:
        while self.running:
            began = time.monotonic()
            try:
                self.record(began, await get(self.port))
            except Exception as e:
                self.failures.append(f"fresh connection: {e!r}")
            await asyncio.sleep(0.008)

    def record(self, began: float, response: Response) -> None:
        if response.status != 200:
            self.failures.append(f"HTTP {response.status}")
        self.answers.append((began, _version(response.body)))

    async def run(self) -> None:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.keep_alive)
            tasks.start_soon(self.keep_alive)
            tasks.start_soon(self.fresh)


def _version(body: str) -> str:
    """The test apps answer ``VERSION ...`` in plain text; the sample app answers JSON."""
    if body.startswith("{"):
        import json

        return str(json.loads(body).get("version"))
    return body.split()[0] if body.split() else ""
