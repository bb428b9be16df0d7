"""Log lines nobody can forge: control characters in a message are escaped.

A client chooses its SSH version string, the names it asks for (subsystems, commands, SFTP
paths, scp file names) and, through a firmware it uploads, version strings; all of them end up
in log lines. A newline in one would start a fake line of its own ("... sshfwup.ssh.server:
accepted key ..."); escape sequences would rewrite a terminal. :class:`EscapingFilter` turns
every C0/C1 control character, DEL, the Unicode line and paragraph separators and the
bidirectional overrides in the *message* into ``\\xNN``/``\\uNNNN``; tracebacks (our own) are
left alone. ``sshfwup serve`` installs it on its log handlers (:func:`install`).
"""

from __future__ import annotations

import logging
import re

__all__ = ["EscapingFilter", "escape", "install"]

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every unsafe character written as an escape (backslashes too, so an
    escape that was in ``text`` stays distinguishable)."""
    if not _UNSAFE.search(text) and "\\" not in text:
        return text
    return _UNSAFE.sub(_escaped, text.replace("\\", "\\\\"))


class EscapingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _UNSAFE.search(message):
            record.msg, record.args = escape(message), None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, EscapingFilter) for f in handler.filters):
            handler.addFilter(EscapingFilter())
