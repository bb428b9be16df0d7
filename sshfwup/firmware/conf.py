"""fwup's configuration syntax, a libconfuse subset: parse, print, quote, expand ``${VAR}``.

This is the syntax only (options, lists, calls, titled sections); what a compiled meta.conf
*means* is :mod:`sshfwup.firmware.metaconf`. The printer writes exactly what fwup writes for a
compiled meta.conf (no indentation, ``key=value``, quoted titles), so a parse/print round trip
gives fwup's bytes back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import FirmwareError

_BARE = re.compile(r"[A-Za-z0-9_.]+")


def quote_value(value: str) -> str:
    """A value as fwup prints it in meta.conf and ``fwup -m``: bare if ``[A-Za-z0-9_.]+``."""
    if _BARE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


_VARIABLE = re.compile(r"\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_variables(text: str, env: Mapping[str, str]) -> str:
    """Expand ``${NAME}`` and ``${NAME:-default}`` like fwup; ``\\$`` is a literal dollar."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "\\$":
            return "$"
        value = env.get(m.group(1), "")
        if m.group(2) is not None and not value:
            return m.group(2)
        return value

    return _VARIABLE.sub(sub, text)


# --- the parsed tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfOption:
    name: str
    value: str | tuple[str, ...]  # a list option (``{a,b}``) is a tuple


@dataclass(frozen=True)
class ConfCall:
    """``name(arg, ...)``: only in fwup's *source* syntax (compiled meta.conf has none)."""

    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class ConfSection:
    name: str
    title: str | None
    items: tuple["ConfOption | ConfCall | ConfSection", ...]

    def option(self, name: str) -> str | tuple[str, ...] | None:
        for item in self.items:
            if isinstance(item, ConfOption) and item.name == name:
                return item.value
        return None

    def sections(self, name: str) -> list["ConfSection"]:
        return [item for item in self.items if isinstance(item, ConfSection) and item.name == name]


# --- parsing ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*|//[^\n]*|/\*.*?\*/)
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<punct>[{}=,()])
  | (?P<word>(?:\$\{[^}\n]*\}|[^\s{}=,()"'\#])+)
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


def _unescape(body: str) -> str:
    # "\$" stays as written so that expand_variables() can still tell a literal dollar apart
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), body, flags=re.DOTALL)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FirmwareError(f"meta.conf line {line}: cannot parse {text[pos:pos + 20]!r}")
        kind = m.lastgroup or ""
        value = m.group(0)
        if kind == "dq":
            tokens.append(("str", _unescape(value[1:-1]), line))
        elif kind == "sq":
            tokens.append(("str", value[1:-1], line))
        elif kind == "word":
            tokens.append(("str", value, line))
        elif kind == "punct":
            tokens.append((value, value, line))
        line += value.count("\n")
        pos = m.end()
    return tokens


class _ConfParser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def fail(self, message: str) -> FirmwareError:
        line = self.tokens[min(self.pos, len(self.tokens) - 1)][2] if self.tokens else 1
        return FirmwareError(f"meta.conf line {line}: {message}")

    def peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def take(self, kind: str) -> str:
        if self.peek() != kind:
            found = self.tokens[self.pos][1] if self.pos < len(self.tokens) else "end of file"
            raise self.fail(f"expected {kind!r}, found {found!r}")
        value = self.tokens[self.pos][1]
        self.pos += 1
        return value

    def items(self, *, nested: bool) -> tuple[ConfOption | ConfCall | ConfSection, ...]:
        items: list[ConfOption | ConfCall | ConfSection] = []
        while True:
            kind = self.peek()
            if kind is None:
                if nested:
                    raise self.fail("missing '}'")
                return tuple(items)
            if kind == "}" and nested:
                return tuple(items)
            name = self.take("str")
            kind = self.peek()
            if kind == "=":
                self.pos += 1
                if self.peek() == "{":
                    self.pos += 1
                    items.append(ConfOption(name, self.values("}")))
                else:
                    items.append(ConfOption(name, self.take("str")))
            elif kind == "(":
                self.pos += 1
                items.append(ConfCall(name, self.values(")")))
            else:
                title = self.take("str") if kind == "str" else None
                self.take("{")
                body = self.items(nested=True)
                self.take("}")
                items.append(ConfSection(name, title, body))

    def values(self, closing: str) -> tuple[str, ...]:
        out: list[str] = []
        if self.peek() == closing:
            self.pos += 1
            return ()
        while True:
            out.append(self.take("str"))
            if self.peek() == ",":
                self.pos += 1
                continue
            self.take(closing)
            return tuple(out)


def parse_conf(text: str) -> ConfSection:
    """Parse fwup's libconfuse dialect (compiled meta.conf, and the source syntax's shape)."""
    parser = _ConfParser(text)
    return ConfSection("", None, parser.items(nested=False))
