"""``sshfwup upload HOST FILE``: stream a firmware to a device and follow the update.

Speaks the same ``fwup`` subsystem as ``cat FILE | ssh -s HOST fwup``, so it works with any
ssh_subsystem_fwup-compatible device. Shows the transfer and fwup's progress, the device's stage
lines and its verdict (:mod:`sshfwup.host.progress_display`), and exits with the device's exit status
(255 when the connection is lost, as ssh does). With ``wait`` it then follows the device: after
a hot swap it shows what runs now; after a reboot verdict it reconnects until the device is back
and reports whether the new firmware booted and was validated, or the device fell back.

Everything the device sends is shown as text only: control characters and escape sequences are
removed, so a device cannot drive the user's terminal (:mod:`sshfwup.host.device_output`).
Ctrl-C ends it with one line of what the device did (:mod:`sshfwup.host.interrupt`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import asyncssh

from .device_output import OutputParser, ParsedLine, clean_text
from .interrupt import (
    EXIT_INTERRUPTED,
    INTERRUPT_QUESTION,
    Interrupt,
    Stage,
    describe_interrupted,
    interrupted_line,
    run_interruptible,
    status_after_interrupt,
)
from .progress_display import Display, make_display

__all__ = [
    "EXIT_INTERRUPTED",
    "Interrupt",
    "OutputParser",
    "ParsedLine",
    "RebootWatch",
    "Stage",
    "clean_text",
    "connect_options",
    "describe_connect_error",
    "describe_interrupted",
    "follow_reboot",
    "judge_reboot",
    "run_interruptible",
    "upload",
    "upload_main",
]

CHUNK = 256 * 1024
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOST = 0, 1, 2, 255
STATUS_COMMAND = "status --json"
POLL_INTERVAL = 1.0  # between reconnection attempts while a device reboots
CLOSE_WAIT = 2.0  # for the connection to close once we are done with it


# --- connecting ---------------------------------------------------------------------------------


KnownHosts = str | None | tuple[()]


def connect_options(username: str | None, identities: list[str] | None, known_hosts: KnownHosts) -> dict[str, object]:
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


async def describe_connect_error(error: BaseException, host: str, port: int, known_hosts: KnownHosts) -> str:
    """What went wrong connecting to a device, and what to do about it (several lines)."""
    where = f"{host}:{port}"
    if isinstance(error, asyncssh.HostKeyNotVerifiable):
        return await _host_key_hint(host, port, known_hosts)
    if isinstance(error, asyncssh.PermissionDenied):
        return (
            f"{where} refused the login: none of the offered keys is in the device's authorized_keys.\n"
            f"  Pass the uploader key with -i KEY (its .pub half must be in [server] authorized_keys)."
        )
    if isinstance(error, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (is `sshfwup serve` running there? right port? -p PORT)"
    if isinstance(error, TimeoutError):
        return f"cannot connect to {where}: no answer in time"
    if isinstance(error, OSError):
        return f"cannot connect to {where}: {error.strerror or error}"
    return f"the connection to {where} failed or was lost: {error}"


async def _host_key_hint(host: str, port: int, known_hosts: KnownHosts) -> str:
    path = known_hosts if isinstance(known_hosts, str) else os.path.expanduser("~/.ssh/known_hosts")
    name = host if port == 22 else f"[{host}]:{port}"
    offered = ""
    try:
        with anyio.fail_after(10):
            key = await asyncssh.get_server_host_key(host, port)
        if key is not None:
            offered = f"  The device offers {key.get_fingerprint()} ({key.get_algorithm()}).\n"
    except (OSError, asyncssh.Error, TimeoutError):
        pass
    if _known_entries(path, host, port):
        return (
            f"the host key of {host}:{port} does NOT match the one recorded in {path}.\n{offered}"
            f"  Either the device's key changed (a new data partition makes a new key) or another machine\n"
            f"  answers at this address. If you know which, remove the old entry and trust the new key:\n"
            f"    ssh-keygen -f {path} -R '{name}'"
        )
    return (
        f"{host}:{port} is not a known host: its host key is not in {path}.\n{offered}"
        f"  Compare it with the fingerprint the device logs at start (`sshfwup serve`: \"listening on …\n"
        f"  (host key SHA256:…)\"), then trust it:\n"
        f"    ssh-keyscan -p {port} -t ed25519 {host} >> {path}\n"
        f"  or, on a network you trust, connect once with --insecure-accept-host-key."
    )


def _known_entries(path: str, host: str, port: int) -> bool:
    try:
        known = asyncssh.read_known_hosts(path)
    except (OSError, ValueError):
        return False
    try:
        matched = known.match(host, host, port)
    except (ValueError, OSError):
        return False
    return any(matched[:2])


def check_identities(identities: list[str]) -> str | None:
    """Why one of the ``-i`` files cannot be used, or None."""
    for name in identities:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            return f"identity file {name}: is a directory, not a private key"
        try:
            asyncssh.read_private_key(str(path))
        except FileNotFoundError:
            return f"identity file {name}: no such file"
        except PermissionError:
            return f"identity file {name}: permission denied"
        except (OSError, asyncssh.KeyImportError) as e:
            return f"identity file {name}: not a usable private key ({e})"
    return None


# --- one upload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    options: dict[str, object]
    known_hosts: KnownHosts

    def ssh(self, command: str) -> str:
        """The OpenSSH command line that runs ``command`` on the device (for hints)."""
        user = self.options.get("username")
        port = f"-p {self.port} " if self.port != 22 else ""
        return f"ssh {port}{f'{user}@' if user else ''}{self.host} {command}"


async def upload(
    host: str,
    file: Path,
    *,
    port: int = 22,
    username: str | None = None,
    identities: list[str] | None = None,
    known_hosts: KnownHosts = (),
    quiet: bool = False,
    wait: bool = False,
    timeout: float = 300.0,
    stream: IO[str] = sys.stderr,
    display: Display | None = None,
    delta_from: Path | None = None,
    interrupt: Interrupt | None = None,
) -> int:
    """Upload ``file``; returns the exit status (see ``sshfwup upload --help``). With
    ``interrupt`` (watching SIGINT: :func:`run_interruptible`), Ctrl-C ends it with one line
    saying what the device did, as its status tells, and EXIT_INTERRUPTED."""
    target = Target(host, port, connect_options(username, identities, known_hosts), known_hosts)
    display = display or make_display(stream, quiet=quiet)
    interrupt = interrupt or Interrupt()
    status: int | None = None
    after: dict[str, Any] | None = None
    conn: asyncssh.SSHClientConnection | None = None
    stage = Stage.CONNECTING
    try:
        with interrupt.guard() as work:
            conn = await asyncssh.connect(host, port, **target.options)
            send = file
            if delta_from is not None:
                stage = Stage.PLANNING
                send = await _plan_delta(conn, file, delta_from, display)
                if send is None:
                    return EXIT_USAGE
            stage = Stage.SENDING
            status = await _stream(conn, send, display)
            stage = Stage.DONE
            if wait and status == EXIT_OK:
                display.close()
                after = await _status_on(conn)
        if work.cancelled_caught:
            display.close()
            display.line(await _interrupted(target, conn, stage, interrupt))
            return EXIT_INTERRUPTED
    except (OSError, asyncssh.Error) as e:
        if status is None:  # lost before the device said how it ended
            display.close()
            display.line(f"sshfwup: {await describe_connect_error(e, host, port, known_hosts)}")
            return EXIT_LOST
    finally:
        if conn is not None:
            conn.close()
            with interrupt.guard(), anyio.move_on_after(CLOSE_WAIT):
                await conn.wait_closed()
    display.close()
    if status is None:
        display.line("sshfwup: the device closed the connection without an exit status")
        return EXIT_LOST
    if not wait or status != EXIT_OK:
        return status
    with interrupt.guard() as work:
        return await _follow(target, file, after, timeout, display)
    display.line(f"sshfwup: interrupted while following the device; the upload itself ended as told above "
                 f"(exit {status}); see `{target.ssh('status')}`")  # fmt: skip
    return EXIT_INTERRUPTED


# --- Ctrl-C (sshfwup/host/interrupt.py): the status question ------------------------------------------


async def _interrupted(target: Target, conn: asyncssh.SSHClientConnection | None, stage: Stage,
                       interrupt: Interrupt) -> str:  # fmt: skip
    options = {**target.options, "connect_timeout": INTERRUPT_QUESTION}
    asker = status_after_interrupt(conn, lambda: asyncssh.connect(target.host, target.port, **options), _status_on)
    return await interrupted_line(stage, interrupt, asker, f"run `{target.ssh('status')}`")


async def _plan_delta(conn: asyncssh.SSHClientConnection, file: Path, fw_dir: Path, display: Display) -> Path | None:
    """The file to send for ``--delta-from``: a patch from the firmware the device runs, or ``file``."""
    from .firmware_delta import DeltaError, plan_upload

    before = await _status_on(conn)
    running = (before or {}).get("running_uuid")
    try:
        plan = await anyio.to_thread.run_sync(lambda: plan_upload(file, running, fw_dir))
    except DeltaError as e:
        display.line(f"sshfwup: --delta-from: {e}")
        return None
    display.line(f"sshfwup: {plan.message}")
    return plan.file


async def _stream(conn: asyncssh.SSHClientConnection, file: Path, display: Display) -> int | None:
    async with conn.create_process(subsystem="fwup", encoding=None, stderr=asyncssh.STDOUT) as proc:
        display.start(file.stat().st_size)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_send, proc, file, display)
            await _receive(proc, display)
            tg.cancel_scope.cancel()  # the device finished early (refusal): stop sending
        await proc.wait()
        if proc.exit_status == EXIT_OK:
            display.accepted()
        return proc.exit_status


async def _send(proc: asyncssh.SSHClientProcess, file: Path, display: Display) -> None:
    try:
        with file.open("rb") as f:
            while chunk := await anyio.to_thread.run_sync(f.read, CHUNK):
                proc.stdin.write(chunk)
                await proc.stdin.drain()  # asyncssh's window: the device's pace
                display.sent(len(chunk))
        proc.stdin.write_eof()
        display.sent_all()
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass  # the device stopped reading; its output says why


async def _receive(proc: asyncssh.SSHClientProcess, display: Display) -> None:
    parser = OutputParser()
    while data := await proc.stdout.read(65536):
        _show(parser.feed(data.decode("utf-8", errors="replace")), display)
    _show(parser.flush(), display)


def _show(items: list[ParsedLine], display: Display) -> None:
    for item in items:
        if item.percent is not None:
            display.fwup(item.percent)
        elif item.text is not None:
            display.line(item.text)


async def _status_on(conn: asyncssh.SSHClientConnection, timeout: float = 10.0) -> dict[str, Any] | None:
    """``status --json`` over an open connection; None if the device does not answer it."""
    try:
        with anyio.fail_after(timeout):
            result = await conn.run(STATUS_COMMAND, check=False)
    except (OSError, asyncssh.Error, TimeoutError):
        return None
    out = result.stdout if isinstance(result.stdout, str) else (result.stdout or b"").decode("utf-8", "replace")
    if result.exit_status != 0:
        return None
    try:
        answer = json.loads(out)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


async def _fetch_status(target: Target, timeout: float) -> dict[str, Any] | None:
    """A fresh connection and ``status --json``; None while the device does not answer."""
    try:
        with anyio.fail_after(timeout):
            options = {**target.options, "connect_timeout": timeout}
            async with asyncssh.connect(target.host, target.port, **options) as conn:
                return await _status_on(conn, timeout)
    except (OSError, asyncssh.Error, TimeoutError):
        return None


# --- after the verdict ----------------------------------------------------------------------------


async def _follow(target: Target, file: Path, after: dict[str, Any] | None, timeout: float, display: Display) -> int:
    say = display.line
    if after is not None and not after.get("rebooting"):
        if after.get("pending_reboot"):
            say(_hot_summary(after, target))
        elif after.get("server") is None:
            say("sshfwup: (the device does not report its state: nothing to wait for)")
        return EXIT_OK
    watch = RebootWatch.expecting(after, file)
    if watch.version is None:
        say("sshfwup: cannot tell which firmware the device should boot (no status, no version in the file)")
        return EXIT_FAILED
    say(f"sshfwup: waiting for {target.host} to reboot into {watch.version} (up to {timeout:.0f} s)")
    return await follow_reboot(target, watch, timeout, say)


async def follow_reboot(target: Target, watch: RebootWatch, timeout: float, say: Callable[[str], None]) -> int:
    """Reconnect until the device booted ``watch.version`` and validated it (EXIT_OK), fell back
    or was not validated in time (EXIT_FAILED), or never came back (EXIT_LOST)."""
    began = time.monotonic()
    answered_once = False
    while True:
        left = timeout - (time.monotonic() - began)
        if left <= 0:
            break
        answer = await _fetch_status(target, min(10.0, max(left, 1.0)))
        elapsed = time.monotonic() - began
        if answer is not None:
            answered_once = True
            verdict, text = watch.judge(answer)
            if text:
                say(f"sshfwup: {text} ({elapsed:.1f} s)")
            if verdict is not None:
                return verdict
        await anyio.sleep(POLL_INTERVAL)
    if watch.booted:
        say(f"sshfwup: {watch.version} runs but was not validated within {timeout:.0f} s; "
            f"see `{target.ssh('status')}` and `{target.ssh('logs')}`")  # fmt: skip
        return EXIT_FAILED
    if not answered_once:
        say(f"sshfwup: the device did not come back within {timeout:.0f} s")
        return EXIT_LOST
    say(f"sshfwup: the device did not reboot into {watch.version} within {timeout:.0f} s")
    return EXIT_FAILED


def _hot_summary(s: dict[str, Any], target: Target) -> str:
    app = s.get("app") if isinstance(s.get("app"), dict) else None
    runs = f"app {app.get('version')} serves from slot {app.get('slot')} (pid {app.get('pid')})" if app else "no app runs"
    version = _slot_version(s, s.get("active")) or "the new firmware"
    return (
        f"sshfwup: {runs}; reboot pending: `{target.ssh('reboot')}` boots {version}, "
        f"which is validated once its app has stayed healthy"
    )


def _slot_version(s: dict[str, Any], slot: object) -> str | None:
    slots = s.get("slots")
    info = slots.get(slot) if isinstance(slots, dict) and isinstance(slot, str) else None
    version = info.get("version") if isinstance(info, dict) else None
    return version if isinstance(version, str) else None


@dataclass
class RebootWatch:
    """Follows a device through a reboot into ``version`` (in ``slot``, when known)."""

    version: str | None
    slot: str | None
    instance: str | None  # the server that announced the reboot: an answer from it is not "back"
    booted: bool = False  # seen running the new firmware, not yet validated
    _said: str = ""

    @classmethod
    def expecting(cls, after: dict[str, Any] | None, file: Path) -> "RebootWatch":
        if after is not None:
            slot = after.get("active") if isinstance(after.get("active"), str) else None
            server = after.get("server") if isinstance(after.get("server"), dict) else {}
            instance = server.get("instance") if isinstance(server.get("instance"), str) else None
            version = _slot_version(after, slot)
            if version:
                return cls(version, slot, instance)
        return cls(_firmware_version(file), None, None)

    def judge(self, s: dict[str, Any]) -> tuple[int | None, str]:
        """(exit status once decided, else None; a line to show, or "")."""
        verdict, text = judge_reboot(s, self)
        if text == self._said:
            text = ""
        else:
            self._said = text
        return verdict, text


def judge_reboot(s: dict[str, Any], watch: RebootWatch) -> tuple[int | None, str]:
    server = s.get("server") if isinstance(s.get("server"), dict) else {}
    if watch.instance is not None and server.get("instance") == watch.instance:
        return None, ""  # the server that announced the reboot: not gone yet
    if s.get("update_in_progress"):
        return None, "the device is back; an update is in progress there"
    root = s.get("running_root")
    running = _slot_version(s, root)
    if s.get("pending_reboot") or s.get("rebooting"):
        return None, ""  # a reboot (into the new firmware, or a fallback) is still to come
    if running == watch.version and (watch.slot is None or root == watch.slot):
        if s.get("validated"):
            return EXIT_OK, f"{running} booted from slot {root} and is validated"
        watch.booted = True
        return None, f"{running} booted from slot {root}; waiting for it to be validated"
    last = s.get("last_update") if isinstance(s.get("last_update"), dict) else {}
    why = f": {last.get('verdict')}" if last.get("verdict") else ""
    return EXIT_FAILED, f"the device fell back: {running or '?'} runs from slot {root}, not {watch.version}{why}"


def _firmware_version(file: Path) -> str | None:
    """The version in the file's meta.conf (read from the head of the archive only)."""
    from sshfwup.firmware.archive import read_head
    from sshfwup.firmware.errors import FirmwareError
    from sshfwup.firmware.zipstream import ZipStream

    try:
        with file.open("rb") as f:
            return read_head(ZipStream(f.read)).version or None
    except (OSError, FirmwareError, ValueError):
        return None


# --- the command ------------------------------------------------------------------------------------


def upload_main(args: argparse.Namespace) -> int:
    file = Path(args.file)
    problem = None
    if file.is_dir():
        problem = f"{file}: is a directory; give the firmware file (FILE.fw)"
    elif not file.exists():
        problem = f"{file}: no such file"
    elif not file.is_file() or not os.access(file, os.R_OK):
        problem = f"{file}: not a readable file"
    problem = problem or check_identities(args.identity)
    if not 0 < args.port < 65536:
        problem = problem or f"-p {args.port}: a port is 1..65535"
    if args.timeout <= 0:
        problem = problem or f"--timeout {args.timeout:g}: must be more than 0 seconds"
    if args.delta_from is not None and not Path(args.delta_from).is_dir():
        problem = problem or f"--delta-from {args.delta_from}: not a directory"
    if problem:
        print(f"sshfwup upload: {problem}", file=sys.stderr)
        return EXIT_USAGE
    user, _, host = args.host.rpartition("@")
    known: KnownHosts = ()
    if args.insecure_accept_host_key:
        known = None
    elif args.known_hosts:
        known = os.path.expanduser(args.known_hosts)
    wait = args.wait if args.wait is not None else sys.stderr.isatty()
    try:
        return _run_upload(args, host, file, user, known, wait)
    except KeyboardInterrupt:  # before the SIGINT watch was up, or after it ended: nothing was asked
        print("sshfwup: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_upload(args: argparse.Namespace, host: str, file: Path, user: str, known: KnownHosts, wait: bool) -> int:
    return anyio.run(
        run_interruptible,
        lambda interrupt: upload(
            host,
            file,
            port=args.port,
            username=user or None,
            identities=args.identity or None,
            known_hosts=known,
            quiet=args.quiet,
            wait=wait,
            timeout=args.timeout,
            delta_from=args.delta_from,
            interrupt=interrupt,
        ),
    )
