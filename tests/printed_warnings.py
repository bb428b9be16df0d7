"""Python warnings in a program's output: find them, or set aside those a dependency raises in its
own code (see tests/test_dependency_warnings.py)."""

from __future__ import annotations

import re

# Python's warning: "path:line: SomeWarning: message", then (when the file is readable) the line
# of source, indented.
_WARNING = re.compile(r"^\s*(?P<path>\S.*?):\d+: (?P<category>\w*Warning): (?P<message>.*)\n(?P<source>[ \t]+\S.*\n)?", re.M)


def printed_warnings(text: str, *, upstream: str | None = None) -> list[str]:
    """The warnings in ``text`` ("Category: message"), except those raised by the code of the
    package directory ``upstream`` itself (emitted before any sshfwup code runs there)."""
    return [
        f"{m['category']}: {m['message']}"
        for m in _WARNING.finditer(text if text.endswith("\n") else text + "\n")
        if upstream is None or not m["path"].startswith(upstream)
    ]


def without_warnings_of(text: str, upstream: str) -> str:
    """``text`` less the warnings (and their source lines) raised by the code under ``upstream``."""
    return _WARNING.sub(lambda m: "" if m["path"].startswith(upstream) else m[0], text if text.endswith("\n") else text + "\n")
