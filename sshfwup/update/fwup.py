"""Run fwup and speak its ``--framing`` protocol.

With ``--framing`` both directions are packets: a 4-byte big-endian length, then the payload.
Input: the ``.fw`` bytes in packets; a zero-length packet ends the input (send it only after a
genuine, complete EOF, or fwup would apply a truncated archive's prefix as if it were whole).
Output payload: 2-byte type + 2-byte big-endian code + text. Types: ``PR`` progress (percent in
the code), ``WN`` information or warning, ``ER`` error, ``OK`` success.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from sshfwup import app as _app_protocol

log = logging.getLogger(__name__)

__all__ = [
    "FrameDecoder",
    "FwupError",
    "FwupEvent",
    "FwupProcess",
    "FwupResult",
    "Progress",
    "Message",
    "Failure",
    "Success",
    "TextRenderer",
    "decode_frames",
    "encode_frame",
    "parse_event",
    "parse_metadata",
    "read_metadata",
]

_HEADER = struct.Struct(">I")
_EXEC_SHIM = Path(_app_protocol.__file__)
MAX_FRAME = 16 * 1024 * 1024  # fwup's messages are short; anything larger is a broken stream


class FwupError(Exception):
    """fwup could not be run, or its output broke the protocol."""


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    percent: int


@dataclass(frozen=True)
class Message:
    """``WN``: information or a warning (``Upgrading partition B``)."""

    text: str


@dataclass(frozen=True)
class Failure:
    """``ER``: fwup gave up; the text says why."""

    text: str
    code: int = 0


@dataclass(frozen=True)
class Success:
    """``OK``: the task finished; the text is empty for apply, the listing for ``-m``."""

    text: str = ""
    code: int = 0


FwupEvent = Progress | Message | Failure | Success


def encode_frame(payload: bytes) -> bytes:
    """Length header for one packet (send the header, then the payload itself)."""
    return _HEADER.pack(len(payload))


def parse_event(payload: bytes) -> FwupEvent:
    if len(payload) < 4:
        raise FwupError(f"fwup sent a {len(payload)}-byte packet; expected at least 4")
    kind = payload[:2]
    (code,) = struct.unpack(">H", payload[2:4])
    text = payload[4:].decode("utf-8", errors="replace")
    if kind == b"PR":
        return Progress(min(code, 100))
    if kind == b"WN":
        return Message(text)
    if kind == b"ER":
        return Failure(text, code)
    if kind == b"OK":
        return Success(text, code)
    raise FwupError(f"fwup sent an unknown packet type {kind!r}")


class FrameDecoder:
    """Incremental decoder: feed bytes as they arrive, get whole payloads back."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 4:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise FwupError(f"fwup sent a {n}-byte packet; its output is not framed")
            if len(self._buf) < 4 + n:
                break
            out.append(bytes(self._buf[4 : 4 + n]))
            del self._buf[: 4 + n]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet still buffered."""
        return len(self._buf)


def decode_frames(data: bytes) -> list[FwupEvent]:
    """Decode a complete captured framed stream (tests and tools)."""
    decoder = FrameDecoder()
    events = [parse_event(p) for p in decoder.feed(data)]
    if decoder.pending:
        raise FwupError(f"framed stream ends inside a packet ({decoder.pending} bytes left over)")
    return events


# --- rendering -------------------------------------------------------------------------------


class TextRenderer:
    """Render events as text close to fwup's own terminal output.

    Progress redraws one line with ``\\r`` like fwup's bar; a message first clears an unfinished
    bar (``\\r\\033[K``, as fwup does) and keeps a finished one. Only changes of the percentage
    are drawn.
    """

    BAR = 36

    def __init__(self) -> None:
        self._on_bar = False
        self._last: int | None = None

    def render(self, event: FwupEvent) -> str:
        if isinstance(event, Progress):
            if event.percent == self._last:
                return ""
            self._last = event.percent
            self._on_bar = True
            filled = "=" * (event.percent * self.BAR // 100)
            return f"\r{event.percent:3d}% [{filled:<{self.BAR}}]"
        if isinstance(event, Message):
            return self._line(f"fwup: {event.text}")
        if isinstance(event, Failure):
            return self._line(f"fwup: {event.text}")
        return self._line("Success!")

    def line(self, text: str) -> str:
        """A line of our own (stage lines, the verdict), placed like fwup's messages."""
        return self._line(text)

    def _line(self, text: str) -> str:
        # Like fwup: a finished bar stays on screen; an unfinished one is cleared for the message.
        prefix = ("\n" if self._last == 100 else "\r\033[K") if self._on_bar else ""
        self._on_bar = False
        return f"{prefix}{text}\n"


# --- metadata (fwup -m -i FILE) --------------------------------------------------------------

_META_LINE = re.compile(r'^(meta-[A-Za-z0-9_-]+)=(.*)$')


def parse_metadata(text: str) -> dict[str, str]:
    """Parse ``fwup -m`` output: ``meta-key=value`` lines, values quoted when needed."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _META_LINE.match(line.strip())
        if not m:
            continue
        key, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        out[key.removeprefix("meta-")] = value
    return out


async def read_metadata(fw: Path, *, fwup: str = "fwup", public_keys: Sequence[Path] = ()) -> dict[str, str]:
    """Metadata of a ``.fw`` file, as fwup itself reports it."""
    args = [fwup, "-m", "-i", str(fw)]
    for key in public_keys:
        args += ["--public-key-file", str(key)]
    try:
        result = await anyio.run_process(args, check=False)
    except FileNotFoundError:
        raise FwupError(f"fwup not found: {fwup}") from None
    text = result.stdout.decode("utf-8", errors="replace")
    if result.returncode != 0:
        raise FwupError(text.strip() or f"fwup -m exited with status {result.returncode}")
    return parse_metadata(text)


# --- running fwup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FwupResult:
    exit_code: int | None  # None: killed by a signal
    success: bool  # exit 0 *and* an OK packet
    errors: tuple[str, ...] = ()
    messages: tuple[str, ...] = ()
    bytes_in: int = 0

    @property
    def reason(self) -> str:
        if self.success:
            return "applied"
        if self.errors:
            return "; ".join(self.errors)
        if self.exit_code is None:
            return "fwup was stopped"
        return f"fwup exited with status {self.exit_code}"


@dataclass
class _Collected:
    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    ok: bool = False


class FwupProcess:
    """One running ``fwup --apply --framing``: write the archive in, read events out.

    Use as an async context manager; leaving the block without :meth:`finish` kills fwup, so an
    interrupted upload can never run on to switch the boot environment.
    """

    def __init__(
        self,
        *,
        fwup: str,
        devpath: Path,
        task: str,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.args = [fwup, "--apply", "--no-unmount", "-d", str(devpath), "--task", task, "--framing", *extra_args]
        self._env = env
        self._proc: anyio.abc.Process | None = None
        self._collected = _Collected()
        self._events_send, self._events_recv = anyio.create_memory_object_stream[FwupEvent](256)
        self._stdout_done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed_input = False
        self.bytes_in = 0

    async def __aenter__(self) -> "FwupProcess":
        env = dict(os.environ)
        if self._env:
            env.update(self._env)
        # Through the supervisor's exec shim: fwup gets PR_SET_PDEATHSIG, so if this server dies
        # mid-upload, fwup dies too instead of reading on to an EOF it might take for the end.
        argv = [sys.executable, "-I", "-S", str(_EXEC_SHIM), "--sshfwup-exec", str(os.getpid()), "", "--", *self.args]
        if not shutil.which(self.args[0]):
            raise FwupError(f"fwup not found: {self.args[0]} (set [fwup] path)")
        try:
            self._proc = await anyio.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
            )
        except FileNotFoundError:
            raise FwupError(f"fwup not found: {self.args[0]}") from None
        except PermissionError:
            raise FwupError(f"fwup is not executable: {self.args[0]}") from None
        log.debug("started %s (pid %d)", " ".join(self.args), self._proc.pid)
        _grow_pipe(self._proc)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._read_stdout)
        self._tg.start_soon(self._read_stderr)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None and self._tg is not None
        if self._proc.returncode is None:
            self.kill()
        with anyio.CancelScope(shield=True):
            await self._proc.wait()
        # Not inside the shield: a task group must be exited from its own enclosing scope.
        await self._tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._proc.aclose()
        self._events_send.close()
        self._events_recv.close()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def write(self, data: bytes) -> None:
        """Send one chunk of the archive; returns once fwup's pipe has room (backpressure)."""
        assert self._proc is not None and self._proc.stdin is not None
        if not data:
            return
        try:
            await self._proc.stdin.send(encode_frame(data) + data if len(data) < 65536 else encode_frame(data))
            if len(data) >= 65536:
                await self._proc.stdin.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError, ConnectionResetError):
            raise FwupError("fwup stopped reading its input") from None
        self.bytes_in += len(data)

    async def close_input(self) -> None:
        """Genuine end of the archive: send the zero-length packet and close stdin."""
        assert self._proc is not None and self._proc.stdin is not None
        if self._closed_input:
            return
        self._closed_input = True
        try:
            await self._proc.stdin.send(encode_frame(b""))
            await self._proc.stdin.aclose()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, BrokenPipeError, ConnectionResetError):
            pass  # fwup already finished or failed; its output says why

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            log.info("killing fwup (pid %d)", self._proc.pid)
            self._proc.kill()

    async def events(self) -> AsyncIterator[FwupEvent]:
        """fwup's events, in order, until its output ends."""
        async for event in self._events_recv:
            yield event

    async def finish(self) -> FwupResult:
        """Close the input (if not yet), wait for fwup to exit, and report what happened."""
        await self.close_input()
        assert self._proc is not None
        code = await self._proc.wait()
        await self._stdout_done.wait()
        c = self._collected
        result = FwupResult(
            exit_code=code if code >= 0 else None,
            success=code == 0 and c.ok and not c.errors,
            errors=tuple(c.errors),
            messages=tuple(c.messages),
            bytes_in=self.bytes_in,
        )
        log.info("fwup exited with %s after %d bytes: %s", code, self.bytes_in, result.reason)
        return result

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        decoder = FrameDecoder()
        try:
            async for chunk in self._proc.stdout:
                for payload in decoder.feed(chunk):
                    event = parse_event(payload)
                    if isinstance(event, Failure):
                        self._collected.errors.append(event.text)
                    elif isinstance(event, Message):
                        self._collected.messages.append(event.text)
                    elif isinstance(event, Success):
                        self._collected.ok = True
                    try:
                        self._events_send.send_nowait(event)
                    except anyio.WouldBlock:
                        # nobody is rendering fast enough: drop progress, never errors
                        if not isinstance(event, Progress):
                            await self._events_send.send(event)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
        except FwupError as e:
            self._collected.errors.append(str(e))
            self.kill()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self._stdout_done.set()
            self._events_send.close()

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        try:
            async for chunk in self._proc.stderr:
                for line in chunk.decode("utf-8", errors="replace").splitlines():
                    if line.strip():
                        log.warning("fwup stderr: %s", line)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


def _grow_pipe(proc: anyio.abc.Process) -> None:
    """A 1 MiB pipe to fwup halves the context switches per MiB without weakening backpressure."""
    try:
        import fcntl

        stdin = proc.stdin
        fd = stdin._stream._transport.get_extra_info("pipe").fileno()  # type: ignore[union-attr]
        fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
    except Exception:  # pragma: no cover - best effort, platform dependent
        pass
