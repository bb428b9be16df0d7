"""What ``sshfwup upload`` shows while a firmware goes to a device.

Two kinds, one interface (:class:`Display`):

- on a terminal, two live bars — the transfer (bytes, rate, time left; frozen at its final
  size, time and average rate once the last byte is sent) and fwup (to 100 %) — with the
  device's lines printed above them. The bars are tqdm's (the optional ``host`` extra:
  ``pip install 'sshfwup[host]'``), which handles terminal width and redraws; without tqdm the
  plain form below is used.
- anywhere else (CI logs, pipes, files), plain lines and no escape codes: the transfer at every
  quarter and its total, fwup at every quarter, then the device's lines as they come. Also on a
  terminal narrower than :data:`MIN_BAR_COLUMNS`, or one that reports no width at all (0
  columns: some serial consoles, ``docker exec -t`` before a resize), where bars would be cut
  down to blanks.

Nothing here is needed on a device: ``sshfwup serve`` never imports it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

__all__ = ["MIN_BAR_COLUMNS", "BarDisplay", "Display", "PlainDisplay", "format_bytes", "format_rate", "make_display",
           "terminal_columns"]

#: The narrowest terminal that gets bars ("upload 100%|" and a 40-column bar); plain lines below.
MIN_BAR_COLUMNS = 60

Clock = Callable[[], float]


class Display(Protocol):
    def start(self, total: int) -> None: ...  # the transfer of ``total`` bytes begins
    def sent(self, n: int) -> None: ...  # ``n`` more bytes went out
    def sent_all(self) -> None: ...  # the last byte went out (into the SSH window: not yet taken)
    def fwup(self, percent: int) -> None: ...  # fwup's progress on the device (past 0: it takes the data)
    def accepted(self) -> None: ...  # the device took the whole upload (exit status 0)
    def line(self, text: str) -> None: ...  # a line from the device, or of our own
    def close(self) -> None: ...  # no more progress: leave the screen tidy (repeatable)


def make_display(stream: IO[str] = sys.stderr, *, quiet: bool = False) -> Display:
    """Bars on a terminal at least :data:`MIN_BAR_COLUMNS` wide (with tqdm installed), else
    plain lines; ``quiet``: lines only."""
    if not quiet and _isatty(stream) and terminal_columns(stream) >= MIN_BAR_COLUMNS:
        try:
            return BarDisplay(stream)
        except ImportError:
            pass
    return PlainDisplay(stream, quiet=quiet)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def terminal_columns(stream: IO[str]) -> int:
    """The width of the terminal ``stream`` writes to; ``COLUMNS`` when the terminal reports none;
    0 when neither says."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return max(int(os.environ.get("COLUMNS", "")), 0)
    except ValueError:
        return 0


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_rate(n: int, seconds: float) -> str:
    return f"{format_bytes(n / max(seconds, 1e-3))}/s"


class _Transfer:
    """Bytes sent, and the clock: the rate is measured from the first byte to the last one."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.total = 0
        self.done = 0
        self.first: float | None = None
        self.last: float | None = None  # set once everything is sent: the rate stops there

    def add(self, n: int) -> None:
        if self.first is None:
            self.first = self.clock()
        self.done += n

    def finish(self) -> bool:
        """Record the end; False if it was recorded already."""
        if self.last is not None:
            return False
        self.last = self.clock()
        if self.first is None:
            self.first = self.last
        return True

    @property
    def seconds(self) -> float:
        if self.first is None:
            return 0.0
        return (self.last if self.last is not None else self.clock()) - self.first

    def summary(self) -> str:
        return f"{format_bytes(self.done)} in {self.seconds:.1f} s, {format_rate(self.done, self.seconds)}"


class PlainDisplay:
    """Lines only, no escape codes: for logs and pipes."""

    def __init__(self, stream: IO[str], *, quiet: bool = False, clock: Clock = time.monotonic) -> None:
        self.stream = stream
        self.quiet = quiet
        self.transfer = _Transfer(clock)
        self._quarter = 0  # transfer quarters shown
        self._fwup_quarter = 0
        self._fwup = 0
        self._taken = False  # the device wrote (fwup past 0 %) or succeeded: "upload 100%" is true
        self._told = False  # the transfer's last line is out

    def start(self, total: int) -> None:
        self.transfer.total = total

    def sent(self, n: int) -> None:
        t = self.transfer
        t.add(n)
        quarter = t.done * 4 // max(t.total, 1)
        if not self.quiet and self._quarter < quarter < 4:
            self._quarter = quarter
            self._print(
                f"upload {t.done * 100 // max(t.total, 1):3d}%  {format_bytes(t.done)} of {format_bytes(t.total)}, "
                f"{format_rate(t.done, t.seconds)}"
            )

    def sent_all(self) -> None:
        self.transfer.finish()
        self._tell()

    def fwup(self, percent: int) -> None:
        if percent > 0:
            self.accepted()
        self._fwup = max(self._fwup, percent)
        if not self.quiet and self._fwup // 25 > self._fwup_quarter:
            self._fwup_quarter = self._fwup // 25
            self._print(f"fwup   {self._fwup:3d}%")

    def accepted(self) -> None:
        self._taken = True
        self._tell()

    def line(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass  # a transfer the device did not take shows no "100%": its own lines say why

    def _tell(self) -> None:
        """``upload 100%`` once everything is sent and the device takes it (not when it went only
        into the SSH window of a device that then refuses it)."""
        if self.transfer.last is not None and self._taken and not self._told:
            self._told = True
            if not self.quiet:
                self._print(f"upload 100%  {self.transfer.summary()}")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class BarDisplay:
    """Two live bars (tqdm) with the device's lines above them; see the module docstring."""

    _UPLOAD = "{desc} {percentage:3.0f}%|{bar:40}| {n_fmt}B/{total_fmt}B {rate_fmt} left {remaining}"
    _FWUP = "{desc} {percentage:3.0f}%|{bar:40}|"

    def __init__(self, stream: IO[str], *, clock: Clock = time.monotonic) -> None:
        from tqdm import tqdm  # the `host` extra; ImportError → plain lines

        self._tqdm = tqdm
        self.stream = stream
        self.transfer = _Transfer(clock)
        self._bars: tuple[Any, Any] | None = None
        self._fwup = 0
        self._taken = False  # as PlainDisplay's

    def start(self, total: int) -> None:
        self.transfer.total = total
        common: dict[str, Any] = {"file": self.stream, "leave": True, "dynamic_ncols": True, "mininterval": 0.1}
        upload = self._tqdm(total=total, desc="upload", unit="B", unit_scale=True, unit_divisor=1000,
                            position=0, smoothing=0.3, bar_format=self._UPLOAD, **common)  # fmt: skip
        fwup = self._tqdm(total=100, desc="fwup  ", position=1, bar_format=self._FWUP, **common)
        self._bars = (upload, fwup)

    def sent(self, n: int) -> None:
        self.transfer.add(n)
        if self._bars and self.transfer.last is None:
            self._bars[0].update(n)

    def sent_all(self) -> None:
        if self.transfer.finish() and self._bars:
            upload = self._bars[0]
            # Frozen: final size, time and average rate (a live rate would fall towards 0).
            upload.bar_format = "{desc} {percentage:3.0f}%|{bar:40}| {n_fmt}B " + _literal(
                f"in {self.transfer.seconds:.1f} s, {format_rate(self.transfer.done, self.transfer.seconds)}"
            )
            upload.refresh()

    def accepted(self) -> None:
        self._taken = True

    def fwup(self, percent: int) -> None:
        if percent > 0:
            self._taken = True
        if self._bars and percent > self._fwup:
            self._bars[1].update(percent - self._fwup)
            self._fwup = percent
            if percent >= 100:
                self._finish_bars()  # what follows (Success!, stages, verdict) reads below them

    def line(self, text: str) -> None:
        if self._bars:
            self._tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._finish_bars()

    def _finish_bars(self) -> None:
        if self._bars is None:
            return
        if self.transfer.done >= self.transfer.total:
            self.sent_all()
        upload, fwup = self._bars
        self._bars = None
        if self.transfer.last is not None and not self._taken:  # sent, but the device did not take it
            upload.bar_format = "{desc} sent|{bar:40}| {n_fmt}B" + _literal(", but the device did not take it all")
            upload.refresh()
        upload.close()
        fwup.close()


def _literal(text: str) -> str:
    """``text`` inside a tqdm bar_format (a str.format template)."""
    return text.replace("{", "{{").replace("}", "}}")
