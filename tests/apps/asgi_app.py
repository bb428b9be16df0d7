"""A tiny ASGI app for the stock-server tests (uvicorn, hypercorn): answers ``<VERSION> <pid>``.

Installed into one fake root per "firmware version" next to a ``VERSION`` file (see
tests/stock_servers.py). No sshfwup-specific code is needed for ``ready = "http"``: the
supervisor's probe reaches the instance through its own copy of the listening socket. With
``APP_NOTIFY_READY=1`` in its environment it also sends ``READY=1`` from the lifespan startup,
the way an app does for ``ready = "notify"`` (the only readiness that works for uvicorn on the
shared-socket path). ``BROKEN`` next to it makes the import fail, like a broken release.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if (HERE / "BROKEN").exists():
    raise RuntimeError("this release is broken on purpose (BROKEN file)")
VERSION = (HERE / "VERSION").read_text().strip()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.environ.get("APP_NOTIFY_READY") == "1":
                    from sshfwup import app as sshfwup_app

                    sshfwup_app.notify_ready()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = f"{VERSION} {os.getpid()}".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
