"""A tiny WSGI app for the stock-server tests (gunicorn): answers ``<VERSION> <pid>``.

Installed into one fake root per "firmware version" next to a ``VERSION`` file (see
tests/stock_servers.py). ``BROKEN`` next to it makes the import fail, like a broken release
(with ``--preload`` gunicorn then never reports ready).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if (HERE / "BROKEN").exists():
    raise RuntimeError("this release is broken on purpose (BROKEN file)")
VERSION = (HERE / "VERSION").read_text().strip()


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    body = f"{VERSION} {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
