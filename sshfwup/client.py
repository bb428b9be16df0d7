"""``sshfwup upload HOST FILE``: stream a firmware to a device and follow the update.

Speaks the same ``fwup`` subsystem as ``cat FILE | ssh -s HOST fwup``, so it works with any
ssh_subsystem_fwup-compatible device. Shows a progress bar for the transfer and for fwup, prints
the device's stage lines and verdict, and exits with the device's exit status (255 when the
connection is lost, as ssh does).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import anyio
import asyncssh

__all__ = ["OutputParser", "connect_options", "upload", "upload_main"]

CHUNK = 256 * 1024
_PERCENT = re.compile(r"^\s*(\d{1,3})% \[")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class ParsedLine:
    text: str | None = None  # a complete line to show
    percent: int | None = None  # fwup's progress


class OutputParser:
    """Turns the device's fwup-style text (``\\r`` progress redraws, ``\\033[K``) into lines + percent."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, data: str) -> list[ParsedLine]:
        self._buf += data
        out: list[ParsedLine] = []
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            for piece in line.split("\r")[:-1]:
                out += self._progress(piece)
            visible = _ANSI.sub("", line.split("\r")[-1]).rstrip()
            if visible:
                out.append(ParsedLine(text=visible))
        # an unterminated tail is a progress redraw in the making
        pieces = self._buf.split("\r")
        for piece in pieces[:-1]:
            out += self._progress(piece)
        self._buf = pieces[-1]
        m = _PERCENT.match(self._buf)
        if m and self._buf.rstrip().endswith("]"):
            out.append(ParsedLine(percent=int(m.group(1))))
            self._buf = ""
        return out

    @staticmethod
    def _progress(piece: str) -> list[ParsedLine]:
        m = _PERCENT.match(_ANSI.sub("", piece))
        return [ParsedLine(percent=int(m.group(1)))] if m else []


class _Display:
    def __init__(self, total: int, stream: IO[str], *, quiet: bool) -> None:
        self.total = max(total, 1)
        self.sent = 0
        self.fwup: int | None = None
        self.stream = stream
        self.tty = stream.isatty() and not quiet
        self.started = time.monotonic()
        self._drawn = False
        self._last = 0.0
        self._quiet = quiet
        self._logged = -1  # without a terminal: progress as lines, at every quarter

    def progress(self, percent: int) -> None:
        self.fwup = percent
        if self.tty:
            self.draw()
        elif not self._quiet and percent // 25 > self._logged:
            self._logged = percent // 25
            bar = "=" * (percent * 36 // 100)
            print(f"{percent:3d}% [{bar:<36}]", file=self.stream, flush=True)

    def line(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)
        self.draw(force=True)

    def draw(self, *, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        pct = self.sent * 100 // self.total
        rate = self.sent / max(now - self.started, 1e-6) / 1e6
        bar = "#" * (pct * 30 // 100)
        fw = f"  fwup {self.fwup:3d}%" if self.fwup is not None else ""
        self.stream.write(f"\r\033[Kupload [{bar:<30}] {pct:3d}% {rate:6.1f} MB/s{fw}")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


def connect_options(
    username: str | None, identities: list[str] | None, known_hosts: str | None | tuple[()]
) -> dict[str, object]:
    """asyncssh.connect() options for our clients. ``known_hosts``: ``()`` for asyncssh's default
    (``~/.ssh/known_hosts``), a file, or None to accept any host key (first contact)."""
    options: dict[str, object] = {}
    if identities:
        options["client_keys"] = identities
    if known_hosts != ():
        options["known_hosts"] = known_hosts
    if username:
        options["username"] = username
    return options


async def upload(
    host: str,
    file: Path,
    *,
    port: int = 22,
    username: str | None = None,
    identities: list[str] | None = None,
    known_hosts: str | None | tuple[()] = (),
    quiet: bool = False,
    stream: IO[str] = sys.stderr,
) -> int:
    """Upload ``file``; returns the device's exit status (255: connection lost)."""
    total = file.stat().st_size
    display = _Display(total, stream, quiet=quiet)
    try:
        async with asyncssh.connect(host, port, **connect_options(username, identities, known_hosts)) as conn:
            async with conn.create_process(subsystem="fwup", encoding=None, stderr=asyncssh.STDOUT) as proc:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_send, proc, file, display)
                    await _receive(proc, display)
                    tg.cancel_scope.cancel()  # the device finished early (refusal): stop sending
                await proc.wait()
                status = proc.exit_status
    except (OSError, asyncssh.Error) as e:
        display.finish()
        print(f"sshfwup: connection to {host}:{port} failed or was lost: {e}", file=stream)
        return 255
    display.finish()
    if status is None:
        print("sshfwup: the device closed the connection without an exit status", file=stream)
        return 255
    return status


async def _send(proc: asyncssh.SSHClientProcess, file: Path, display: _Display) -> None:
    try:
        with file.open("rb") as f:
            while chunk := await anyio.to_thread.run_sync(f.read, CHUNK):
                proc.stdin.write(chunk)
                await proc.stdin.drain()  # asyncssh's window: the device's pace
                display.sent += len(chunk)
                display.draw()
        proc.stdin.write_eof()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass  # the device stopped reading; its output says why


async def _receive(proc: asyncssh.SSHClientProcess, display: _Display) -> None:
    parser = OutputParser()
    while True:
        data = await proc.stdout.read(65536)
        if not data:
            break
        for item in parser.feed(data.decode("utf-8", errors="replace")):
            if item.percent is not None:
                display.progress(item.percent)
            elif item.text is not None:
                display.line(item.text)


def upload_main(args: argparse.Namespace) -> int:
    file = Path(args.file)
    if not file.is_file():
        print(f"sshfwup: {file}: no such file", file=sys.stderr)
        return 2
    user, _, host = args.host.rpartition("@")
    known: str | None | tuple[()] = ()
    if args.insecure_accept_host_key:
        known = None
    elif args.known_hosts:
        known = os.path.expanduser(args.known_hosts)
    return anyio.run(
        lambda: upload(
            host,
            file,
            port=args.port,
            username=user or None,
            identities=args.identity or None,
            known_hosts=known,
            quiet=args.quiet,
        )
    )
