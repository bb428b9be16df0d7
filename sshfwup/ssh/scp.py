"""Legacy ``scp -t`` (``scp -O``): the sink side of the rcp protocol, for firmware only.

Protocol (the client is the source): we send ``\\0`` when ready; the client sends ``T…`` (with
``-p``) and ``C<mode> <size> <name>\\n``; we answer ``\\0`` to accept or ``\\1scp: <reason>\\n`` to
refuse; then exactly ``size`` bytes follow, then the client's ``\\0``; we answer ``\\0`` when the
update succeeded or ``\\1scp: <verdict>\\n`` when it did not. Progress goes to stderr so it never
mixes with the protocol on stdout.
"""

from __future__ import annotations

import logging
import shlex

import anyio
import asyncssh

from sshfwup.device import Device
from sshfwup.update.intake import CUT, Intake, UploadBounds, UploadStopped
from sshfwup.update.report import Report
from .sftp import parse_target
from sshfwup.update.update import EXIT_FAILED, EXIT_OK, Update, UpdateError, UpdateRefused, Uploader

log = logging.getLogger(__name__)

__all__ = ["ScpRefused", "parse_scp_command", "run_scp_sink"]

MAX_LINE = 4096


class ScpRefused(Exception):
    pass


def parse_scp_command(command: str) -> str:
    """The target path of an ``scp -t [-v] [-p] [-d] [--] PATH`` command; refuses anything else."""
    try:
        argv = shlex.split(command)
    except ValueError:
        raise ScpRefused("malformed scp command") from None
    if not argv or argv[0] != "scp":
        raise ScpRefused("not an scp command")
    sink = False
    paths: list[str] = []
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            paths.extend(args)
            break
        if arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "t":
                    sink = True
                elif flag in "vpdq":
                    pass
                elif flag == "f":
                    raise ScpRefused("downloading files is not allowed; this device only accepts firmware uploads")
                elif flag == "r":
                    raise ScpRefused("directories are not accepted; upload a single .fw file")
                else:
                    raise ScpRefused(f"unsupported scp option -{flag}")
        else:
            paths.append(arg)
    if not sink:
        raise ScpRefused("only uploads (scp -t) are accepted")
    if len(paths) != 1:
        raise ScpRefused("expected exactly one target path")
    return paths[0]


async def run_scp_sink(process: asyncssh.SSHServerProcess, device: Device, uploader: Uploader) -> int:
    """Serve one ``scp -t``; returns the exit status."""
    stdin, stdout = process.stdin, process.stdout

    async def err(text: str) -> None:
        process.stderr.write(text.encode("utf-8"))

    report = Report(err)
    try:
        target_dir = parse_target(parse_scp_command(process.command or ""))
    except ScpRefused as e:
        stdout.write(b"\x02scp: " + str(e).encode() + b"\n")
        return EXIT_FAILED
    except asyncssh.SFTPError as e:
        stdout.write(b"\x02scp: " + e.reason.encode() + b"\n")
        return EXIT_FAILED

    status = EXIT_OK
    uploaded = False
    stdout.write(b"\0")
    idle = device.config.server.idle_timeout
    while True:
        try:
            with anyio.fail_after(idle):
                line = await stdin.readline()
        except TimeoutError:
            log.warning("scp from %s sent no file header for %.0f s; closing", uploader, idle)
            stdout.write(f"\x02scp: no file header for {idle:.0f} s\n".encode())
            return EXIT_FAILED
        if not line:
            break
        if len(line) > MAX_LINE or not line.endswith(b"\n"):
            stdout.write(b"\x02scp: protocol error\n")
            return EXIT_FAILED
        kind, body = line[:1], line[1:-1].decode("utf-8", errors="replace")
        if kind == b"T" or kind == b"E":
            stdout.write(b"\0")
            continue
        if kind in (b"\x01", b"\x02"):
            log.warning("scp client reported: %s", body)
            status = EXIT_FAILED
            if kind == b"\x02":
                break
            continue
        if kind == b"D":
            stdout.write(b"\x02scp: directories are not accepted; upload a single .fw file\n")
            return EXIT_FAILED
        if kind != b"C":
            stdout.write(b"\x02scp: protocol error\n")
            return EXIT_FAILED
        try:
            _mode, size_text, name = body.split(" ", 2)
            size = int(size_text)
            if size < 0 or "/" in name or name in ("", ".", ".."):
                raise ValueError
        except ValueError:
            stdout.write(b"\x02scp: malformed file header\n")
            return EXIT_FAILED
        reason = _check_target(target_dir, name, size, device, uploaded)
        if reason:
            stdout.write(b"\x01scp: " + reason.encode() + b"\n")
            status = EXIT_FAILED
            continue
        uploaded = True
        ok, verdict, refused = await _receive(process, device, uploader, report, size)
        if ok:
            await report.line(f"sshfwup: {verdict}")
            stdout.write(b"\0")
        elif refused:
            # refused before any data: scp prints the protocol's message; one copy is enough
            status = EXIT_FAILED
            stdout.write(b"\x01scp: " + verdict.replace("\n", " ").encode() + b"\n")
        else:
            # the verdict follows the stage lines on stderr; the protocol only says it failed
            status = EXIT_FAILED
            await report.line(f"sshfwup: {verdict}")
            stdout.write(b"\x01scp: firmware update failed (see the message above)\n")
    return status


def _check_target(target: object, name: str, size: int, device: Device, uploaded: bool) -> str | None:
    if uploaded:
        return "one firmware per session"
    if target is None and not (name == "fwup" or name.endswith(".fw")):
        return f"{name}: {'only .fw files are accepted (or the name fwup)'}"
    limit = device.config.server.max_upload_size
    if limit and size > limit:
        return f"{name} is {size} bytes, over the limit of {limit} bytes ([server] max_upload_size)"
    return None


async def _receive(
    process: asyncssh.SSHServerProcess, device: Device, uploader: Uploader, report: Report, size: int
) -> tuple[bool, str, bool]:
    """(ok, verdict, refused): ``refused`` when the precheck said no before any data was accepted."""
    stdin, stdout = process.stdin, process.stdout
    chunk = max(process.channel.get_recv_window(), 65536)
    bounds = UploadBounds.of(device.config.server)
    remaining = size
    unread = size + 1  # the file's bytes and the end byte after them
    try:
        async with Update(device, uploader, report) as update:
            intake = Intake(update, bounds)
            stdout.write(b"\0")
            while remaining:
                data = await intake.read(lambda: stdin.read(min(chunk, remaining)))
                if not data:
                    update.abort(CUT)
                    return False, CUT, False
                remaining -= len(data)
                unread -= len(data)
                await update.write(data)
            ack = await intake.read(lambda: stdin.readexactly(1))
            unread = 0
            if ack != b"\0":
                update.abort("the client reported an error while sending")
                return False, "the client reported an error while sending", False
            outcome = await update.finish()
    except UpdateRefused as e:
        # refused before we accepted the header: the client will not send the data
        return False, str(e), True
    except UploadStopped as e:  # a bound: the client may still be sending, or gone
        return False, str(e), False
    except UpdateError as e:
        # failed mid-file (fwup's error, the size limit): the update lock is released already;
        # the protocol still needs the rest of the bytes before the client reads our answer
        await _discard(stdin, unread, bounds.idle)
        return False, str(e), False
    except (asyncssh.Error, OSError, EOFError) as e:
        return False, f"{CUT} ({e})", False
    return outcome.ok, outcome.verdict, False


async def _discard(stdin: asyncssh.SSHReader[bytes], unread: int, idle: float) -> None:
    """Read and drop the rest of a failed file and its end byte (``unread`` bytes in all), each
    read bounded by ``idle``."""
    try:
        while unread > 0:
            with anyio.fail_after(idle):
                data = await stdin.read(min(unread, 1 << 20))
            if not data:
                return
            unread -= len(data)
    except (TimeoutError, asyncssh.Error, OSError):
        pass
