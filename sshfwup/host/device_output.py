"""What a device sends an uploader, made safe to show: fwup-style progress redraws (``\\r``,
``\\033[K``) told apart from lines, and every escape sequence and control character removed, so
a device cannot drive the user's terminal. Used by ``sshfwup upload`` and the demo."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["OutputParser", "ParsedLine", "clean_text"]

_BAR = re.compile(r"^\s*(\d{1,3})% \[[= ]*\]\s*$")
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (but \t, \n), DEL, C1 (U+009B is a CSI)
_MAX_TAIL = 64 * 1024  # an unterminated line longer than this is shown as it is


def clean_text(text: str) -> str:
    """``text`` without escape sequences and control characters (tabs stay)."""
    return _CONTROL.sub("", _CSI.sub("", text))


@dataclass(frozen=True)
class ParsedLine:
    text: str | None = None  # a complete line to show
    percent: int | None = None  # fwup's progress


class OutputParser:
    """Turns the device's fwup-style text (``\\r`` progress redraws, ``\\033[K``) into lines and
    percentages. A bar is progress wherever it stands — also the finished ``100% [====]`` that
    the device leaves on its own line — never a message."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, data: str) -> list[ParsedLine]:
        self._buf += data
        out: list[ParsedLine] = []
        while (end := self._buf.find("\n")) >= 0:
            line, self._buf = self._buf[:end], self._buf[end + 1 :]
            *redraws, last = line.split("\r")
            out += [p for piece in redraws if (p := _bar(piece))]
            bar = _bar(last)
            if bar is not None:
                out.append(bar)
            elif text := clean_text(last).rstrip():
                out.append(ParsedLine(text=text))
        # an unterminated tail is a progress redraw in the making
        *redraws, tail = self._buf.split("\r")
        out += [p for piece in redraws if (p := _bar(piece))]
        bar = _bar(tail)
        if bar is not None:
            out.append(bar)
            tail = ""
        elif len(tail) > _MAX_TAIL:
            out.append(ParsedLine(text=clean_text(tail).rstrip()))
            tail = ""
        self._buf = tail
        return out

    def flush(self) -> list[ParsedLine]:
        """The last, unterminated line (the device closed the channel without a newline)."""
        tail, self._buf = self._buf, ""
        text = clean_text(tail.split("\r")[-1]).rstrip()
        return [ParsedLine(text=text)] if text else []


def _bar(piece: str) -> ParsedLine | None:
    m = _BAR.match(clean_text(piece))
    return ParsedLine(percent=min(int(m.group(1)), 100)) if m else None
