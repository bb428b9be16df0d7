"""Log lines cannot be forged through what a client sends."""

from __future__ import annotations

import io
import logging

from sshfwup.ssh.logsafe import EscapingFilter, escape, install


def test_escape_controls_separators_and_bidi() -> None:
    assert escape("plain text, ünïcode ok") == "plain text, ünïcode ok"
    assert escape("a\nb\rc\td\x1b[31m\x7f") == "a\\x0ab\\x0dc\\x09d\\x1b[31m\\x7f"
    assert escape("x\u2028y\u202ez\x85") == "x\\u2028y\\u202ez\\x85"
    # an escape the client typed stays distinguishable from one we made
    assert escape("\\x0a\n") == "\\\\x0a\\x0a"


def test_a_forged_line_stays_on_its_line() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test_logsafe")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        install(logger)
        install(logger)  # idempotent
        assert sum(isinstance(f, EscapingFilter) for f in handler.filters) == 1
        client_version = "SSH-2.0-x\nINFO sshfwup.ssh.server: accepted key SHA256:forged for root"
        logger.warning("%s: client %s", "127.0.0.1:5", client_version)
        logger.warning("plain %s", "message")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "WARNING test_logsafe: 127.0.0.1:5: client SSH-2.0-x\\x0aINFO sshfwup.ssh.server: accepted key SHA256:forged for root",
        "WARNING test_logsafe: plain message",
    ]
