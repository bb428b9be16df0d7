"""The SSH side: listener, authentication, and what each kind of session may do.

Allowed: the ``fwup`` subsystem (raw ``.fw`` on stdin), SFTP (a virtual upload-only filesystem),
``scp -t`` (legacy scp uploads), and the device commands in :mod:`sshfwup.ssh.commands` — as far as
the key's authorized_keys options allow (:mod:`sshfwup.ssh.authkeys`: ``command=``, ``from=``,
``expiry-time=``, ``cert-authority``/``principals=``).
Refused: passwords, keyboard-interactive, host-based auth, shells, ptys, other exec commands,
port/agent/X11 forwarding.

Limits (docs/security.md): unauthenticated connections are admitted, queued or refused with a
reason by :mod:`sshfwup.ssh.gate` and :mod:`sshfwup.ssh.admission` (sshd's MaxStartups and
PerSourceMaxStartups, silent connections shed first) and must log in
within ``login_timeout``; at most ``max_connections`` are authenticated at once; an
authenticated connection that runs nothing for ``session_idle_timeout`` is closed.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncssh

from . import commands
from .admission import Admission, StartupLimits, Ticket
from .authkeys import AuthorizedKeys, SessionRequest, resolve_session
from .gate import Gate, Place
from sshfwup.config import Config
from sshfwup.system.fsutil import write_atomically
from sshfwup.system.ports import bind_ssh
from sshfwup.device import Device
from sshfwup.update.intake import CUT, Intake, UploadBounds
from sshfwup.update.report import Report
from .scp import run_scp_sink
from .sftp import FirmwareSFTPServer
from sshfwup.update.update import EXIT_FAILED, Update, UpdateError, UpdateRefused, Uploader

log = logging.getLogger(__name__)

__all__ = ["FirmwareServer", "load_or_create_host_key"]

ONLY = (
    "this device accepts firmware uploads only: `cat app.fw | ssh -s HOST fwup`, scp/sftp to HOST:/fwup, "
    "or the commands: " + ", ".join(commands.NAMES)
)


# Key exchange: asyncssh's algorithms, with curve25519-sha256 first. Dropbear's client sends its
# key-exchange packet before it has seen the server's list (a guess, RFC 4253 7.1) and, by the
# RFC, counts the guess right only when both sides list the same algorithm *first*; asyncssh
# (2.24) counts it right when the negotiated algorithm is the guessed one. With asyncssh's own
# first (mlkem768x25519-sha256) Dropbear 2022.83 re-sends its packet, asyncssh has used the guessed
# one already, and the re-sent one ends the connection ("Key exchange not in progress"). The
# server's order never changes what is negotiated (the client's order decides); it only makes the
# two judgements agree for clients whose first is curve25519-sha256. docs/asyncssh-kex-guess.md
# has the evidence and the upstream report; tests/ssh/test_clients.py runs dbclient.
KEX_ALGS = "^curve25519-sha256"

FORWARDING_REFUSED = "port forwarding is not allowed on this device (firmware uploads and device commands only)"


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The server's ed25519 host key, generated on first start and stored mode 0600.

    A damaged key file (empty, truncated, not a key) must not keep SSH down: it is moved aside
    (``<path>.damaged-<time>``) and a new key is made, loudly — clients will see a new host key.
    Keys are written atomically and fsync'd, so a power cut leaves the old key or the new one.
    """
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("host key %s is readable by others (mode %o); fixing to 0600", path, mode)
            os.chmod(path, 0o600)
        try:
            return asyncssh.read_private_key(str(path))
        except (OSError, ValueError, asyncssh.KeyImportError) as e:
            aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
            os.replace(path, aside)
            log.error("host key %s is damaged (%s): moved it to %s and generated a new one; clients will "
                      "report a changed host key", path, e, aside)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    write_atomically(path, key.export_private_key(), mode=0o600)  # 0600 from the first byte
    write_atomically(Path(f"{path}.pub"), key.export_public_key(), mode=0o644)
    log.info("generated host key %s (%s)", path, key.get_fingerprint())
    return key


class _Activity:
    """What an authenticated connection is doing, for ``session_idle_timeout``."""

    def __init__(self) -> None:
        self.running = 0  # sessions (or SFTP requests) in progress
        self.uploading = False  # an SFTP upload is open: the upload's idle_timeout applies
        self.since = time.monotonic()

    @contextmanager
    def busy(self) -> Iterator[None]:
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self.since = time.monotonic()

    def idle_for(self) -> float:
        return 0.0 if self.running else time.monotonic() - self.since


class _Connection(asyncssh.SSHServer):
    """Per-connection policy: who may connect and log in, what they may open."""

    def __init__(self, app: "FirmwareServer", ticket: Ticket, place: Place) -> None:
        self._app = app
        self._conn: asyncssh.SSHServerConnection | None = None
        self._keys: AuthorizedKeys | None = None
        self._peer = "?"
        self._ticket: Ticket | None = ticket  # while unauthenticated (admitted by the gate)
        self._place = place
        self._logged_in = False
        self._idle_watch = anyio.CancelScope()
        self.activity = _Activity()

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._place.conn, self._place.on_drop = conn, self._shed
        self._app.connections += 1
        log.info("connection from %s", self._peer)

    def _shed(self) -> None:
        assert self._conn is not None
        why = "silent" if self._conn.get_extra_info("client_version") is None else "not logged in yet"
        log.warning("dropped connection from %s: %s, and a new connection needed its place", self._peer, why)
        self._conn.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ticket is not None:
            self._app.admission.leave(self._ticket)
            self._ticket = None
        self._app.gate.freed()
        if self._logged_in:
            self._app.logged_in -= 1
            self._logged_in = False
        self._idle_watch.cancel()
        self._app.connections -= 1
        log.info("connection from %s closed%s", self._peer, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        assert self._conn is not None
        if self._ticket is not None:
            self._app.admission.trying(self._ticket)
        log.info("%s: client %s, user %s", self._peer, self._conn.get_extra_info("client_version"), username)
        if self._app.logged_in >= self._app.config.server.max_connections:
            self._conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections; try again later")
            return True
        # Re-read per connection: adding or revoking a key needs no restart.
        self._keys = self._app.read_authorized_keys()
        self._conn.set_authorized_keys(self._keys)
        return True

    def auth_completed(self) -> None:
        conn, keys = self._conn, self._keys
        assert conn is not None
        if keys is None or keys.last is None:  # cannot happen: only an authorized_keys line lets anyone in
            log.error("%s logged in without a matching authorized_keys line; disconnecting", self._peer)
            conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "internal error")
            return
        match = keys.last
        if self._ticket is not None:
            self._app.admission.authenticated(self._ticket)
            self._ticket = None
            self._app.gate.freed()
        if self._app.logged_in >= self._app.config.server.max_connections:
            conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections; try again later")
            return
        self._app.logged_in += 1
        self._logged_in = True
        forced = match.command
        cert_forced = conn.get_certificate_option("force-command")
        if isinstance(cert_forced, str):
            if forced is not None and forced != cert_forced:
                log.warning("%s from %s: the certificate's force-command and %s's command= differ; refused",
                            match.describe(), self._peer, match.where)  # fmt: skip
                conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "certificate and key options conflict")
                return
            forced = cert_forced
        fingerprint = match.fingerprint if not match.certificate else f"{match.fingerprint} ({match.describe()})"
        conn.set_extra_info(sshfwup_fingerprint=fingerprint, sshfwup_match=match, sshfwup_forced=forced,
                            sshfwup_activity=self.activity)  # fmt: skip
        log.info(
            "accepted %s for %s from %s (%s)%s", match.describe(), conn.get_extra_info("username"), self._peer,
            match.where, f"; restricted to `{forced}`" if forced is not None else "",
        )  # fmt: skip
        self._app.watch_idle(conn, self.activity, self._idle_watch, self._peer)

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # asyncssh asks only when no authorized_keys line accepted the key
        log.warning("rejected key %s for %s from %s", key.get_fingerprint(), username, self._peer)
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        log.warning("rejected a certificate signed by %s for %s from %s", key.get_fingerprint(), username, self._peer)
        return False

    # no forwarding of any kind
    def connection_requested(self, *args: Any) -> bool:
        log.warning("refused a port-forwarding request from %s", self._peer)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, FORWARDING_REFUSED)

    def server_requested(self, *args: Any) -> bool:
        # SSH has no words for a refused global request: the client says "remote port forwarding failed"
        log.warning("refused a remote port-forwarding request from %s", self._peer)
        return False

    def unix_connection_requested(self, *args: Any) -> bool:
        log.warning("refused a unix-socket forwarding request from %s", self._peer)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, FORWARDING_REFUSED)

    def unix_server_requested(self, *args: Any) -> bool:
        return False


class FirmwareServer:
    """Owns the listener; dispatches sessions; performs a requested reboot."""

    def __init__(self, config: Config, device: Device | None = None) -> None:
        self.config = config
        self.device = device or Device(config)
        cfg = config.server
        start, rate, full = cfg.max_startups
        self.admission = Admission(StartupLimits(start, rate, full, cfg.max_startups_per_source,
                                                 penalty_exempt=cfg.penalty_exempt))  # fmt: skip
        self.gate = Gate(self.admission, self._run_connection, login_timeout=cfg.login_timeout,
                         queue_per_source=cfg.startup_queue_per_source, queue_total=cfg.startup_queue)  # fmt: skip
        self.logged_in = 0  # authenticated connections
        self.connections = 0  # open SSH connections (asyncssh's), logged in or not yet
        self._options: asyncssh.SSHServerConnectionOptions | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    def read_authorized_keys(self) -> AuthorizedKeys:
        keys = AuthorizedKeys()
        for path in self.config.server.authorized_keys:
            keys.add_file(path)
        return keys

    def watch_idle(
        self, conn: asyncssh.SSHServerConnection, activity: _Activity, scope: anyio.CancelScope, peer: str
    ) -> None:
        """Close ``conn`` once it has run nothing for ``session_idle_timeout`` (an open SFTP
        upload: for ``idle_timeout``). Ends with the connection (``scope`` is cancelled then)."""
        cfg = self.config.server

        async def watch() -> None:
            with scope:
                while True:
                    limit = cfg.idle_timeout if activity.uploading else cfg.session_idle_timeout
                    idle = activity.idle_for()
                    if idle >= limit:
                        break
                    await anyio.sleep(limit - idle)
                log.warning("closing the connection from %s: nothing ran for %.0f s", peer, idle)
                conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"idle for {idle:.0f} s; closing the connection")

        assert self._tg is not None
        self._tg.start_soon(watch)

    async def start(self, tg: anyio.abc.TaskGroup, sockets: list[socket.socket] | None = None) -> None:
        """Serve on ``sockets`` (bound by the supervisor: :func:`bind_ssh`), or bind them here."""
        cfg = self.config.server
        self._tg = tg
        host_key = load_or_create_host_key(cfg.host_key)
        self._options = self._connection_options(host_key, tg)
        self.gate.adopt(sockets if sockets is not None else bind_ssh(cfg.listen, cfg.port))
        log.info("listening on %s:%d (host key %s)", cfg.listen, self.port, host_key.get_fingerprint())

    def _connection_options(self, host_key: asyncssh.SSHKey, tg: anyio.abc.TaskGroup) -> asyncssh.SSHServerConnectionOptions:
        cfg = self.config.server
        return asyncssh.SSHServerConnectionOptions(
            server_host_keys=[host_key],
            kex_algs=KEX_ALGS,
            process_factory=self._handle,
            sftp_factory=functools.partial(_SFTPSession, device=self.device, tg=tg),
            allow_scp=False,
            encoding=None,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            login_timeout=cfg.login_timeout,
            keepalive_interval=15,
            keepalive_count_max=4,
        )

    async def _run_connection(self, sock: socket.socket, ticket: Ticket, place: Place, login_timeout: float) -> None:
        """An admitted connection, as asyncssh's listener would have run it (the gate accepted it)."""
        try:
            await asyncssh.run_server(sock, options=self._options, login_timeout=login_timeout,
                                      server_factory=functools.partial(_Connection, self, ticket, place))  # fmt: skip
        except (asyncssh.Error, OSError, TimeoutError):
            pass  # the connection has logged how it ended
        if place.conn is None:  # it never got as far as asyncssh
            self.admission.leave(ticket)
            sock.close()

    @property
    def port(self) -> int:
        return self.gate.sockets[0].getsockname()[1]

    async def close(self) -> None:
        await self.gate.close()

    # --- sessions --------------------------------------------------------------------------

    async def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        conn = process.get_extra_info("connection")
        activity = conn.get_extra_info("sshfwup_activity") if conn else None
        with activity.busy() if activity else _nothing():
            status = await self._session(process, conn)
        try:
            process.exit(status)
        except (OSError, asyncssh.Error):
            pass

    async def _session(self, process: asyncssh.SSHServerProcess, conn: Any) -> int:
        uploader = _uploader(process)
        if process.subsystem:
            asked = SessionRequest("subsystem", process.subsystem)
        else:
            asked = SessionRequest("shell") if process.command is None else SessionRequest("exec", process.command)
        what = resolve_session(conn.get_extra_info("sshfwup_forced") if conn else None, asked)
        try:
            if isinstance(what, str):
                log.warning("refused %r from %s: %s", asked.name or asked.kind, uploader, what)
                return _refuse(process, what)
            if what.kind == "subsystem" and what.name == "fwup":
                return await self._fwup_subsystem(process, uploader)
            if what.kind == "subsystem":
                log.warning("refused subsystem %r from %s", what.name, uploader)
                return _refuse(process, f"unknown subsystem {what.name!r}; {ONLY}")
            if what.kind == "shell":
                log.warning("refused a shell from %s", uploader)
                return _refuse(process, f"no shell here; {ONLY}")
            if what.name.startswith("scp "):
                return await run_scp_sink(process, self.device, _with(uploader, "scp -O"))
            return await commands.run(process, self.device, uploader, command=what.name)
        except Exception:
            log.exception("session from %s failed", uploader)
            return _refuse(process, "internal error; see the device log")

    async def _fwup_subsystem(self, process: asyncssh.SSHServerProcess, uploader: Uploader) -> int:
        """``cat app.fw | ssh -s HOST fwup``: raw bytes in, fwup's text + our verdict out."""

        async def out(text: str) -> None:
            process.stdout.write(text.encode("utf-8"))

        report = Report(out)
        chan = process.channel
        chunk = max(chan.get_recv_window(), 65536)  # small reads would defeat flow control
        try:
            async with Update(self.device, uploader, report) as update:
                intake = Intake(update, UploadBounds.of(self.config.server))
                while True:
                    try:
                        data = await intake.read(lambda: process.stdin.read(chunk))
                    except (asyncssh.Error, OSError, EOFError) as e:
                        update.abort(f"connection lost: {e}")
                        log.warning("upload from %s interrupted: %s", uploader, e)
                        return EXIT_FAILED
                    if not data:
                        if chan.is_closing():
                            # a polite disconnect also reads as EOF: never treat it as a complete upload
                            update.abort(CUT)
                            log.warning("upload from %s interrupted: client disconnected", uploader)
                            return EXIT_FAILED
                        break
                    await update.write(data)
                outcome = await update.finish()
        except UpdateRefused as e:
            await report.error(str(e))
            return EXIT_FAILED
        except UpdateError as e:
            await report.line(f"sshfwup: {e}")
            log.warning("update from %s failed: %s", uploader, e)
            return EXIT_FAILED
        await report.line(f"sshfwup: {outcome.verdict}")
        return outcome.exit_status

    # --- reboot ----------------------------------------------------------------------------

    async def reboot_when_requested(self) -> None:
        request = await self.device.wait_reboot_request()
        # The uploader's exit status is sent and its channel closing: give it a moment to land.
        await anyio.sleep(self.config.device.reboot_delay)
        log.warning("rebooting: %s", request.reason)
        await self.device.reboot()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


class _SFTPSession(FirmwareSFTPServer):
    """The upload-only SFTP server as a session of its connection: under the key's ``command=``
    restriction, and seen by the idle timeout (every upload request counts as activity)."""

    def __init__(self, chan: asyncssh.SSHServerChannel, *, device: Device, tg: anyio.abc.TaskGroup) -> None:
        super().__init__(chan, device=device, tg=tg)
        conn = chan.get_extra_info("connection")
        self._activity: _Activity = conn.get_extra_info("sshfwup_activity") or _Activity()
        what = resolve_session(conn.get_extra_info("sshfwup_forced"), SessionRequest("subsystem", "sftp"))
        self._refusal = what if isinstance(what, str) else None
        if self._refusal:
            log.warning("refused sftp from %s: %s", _peer_of(conn), self._refusal)
            chan.write_stderr(f"Error: {self._refusal}\n".encode())

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if self._refusal:
            raise asyncssh.SFTPPermissionDenied(self._refusal)
        with self._activity.busy():
            handle = await super().open(path, pflags, attrs)
        self._activity.uploading = True
        return handle

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        with self._activity.busy():
            return await super().write(file_obj, offset, data)

    async def close(self, file_obj: object) -> None:
        try:
            with self._activity.busy():
                await super().close(file_obj)
        finally:
            self._activity.uploading = False

    def realpath(self, path: bytes) -> bytes:
        with self._activity.busy():
            return super().realpath(path)


def _peer_of(conn: Any) -> str:
    peer = conn.get_extra_info("peername") if conn else None
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _uploader(process: asyncssh.SSHServerProcess) -> Uploader:
    conn = process.get_extra_info("connection")
    peer = process.get_extra_info("peername")
    if process.subsystem:
        transport = f"ssh -s {process.subsystem if process.subsystem in ('fwup', 'sftp') else '(other)'}"
    else:  # the command comes from the client: name it only when it is one of ours
        word = (process.command or "shell").split(" ")[0]
        transport = word if word in ("shell", "scp", *commands.COMMANDS) else "exec"
    return Uploader(
        user=process.get_extra_info("username") or "?",
        fingerprint=conn.get_extra_info("sshfwup_fingerprint", "?") if conn else "?",
        peer=f"{peer[0]}:{peer[1]}" if peer else "?",
        transport=transport,
    )


def _with(uploader: Uploader, transport: str) -> Uploader:
    return Uploader(uploader.user, uploader.fingerprint, uploader.peer, transport)


def _refuse(process: asyncssh.SSHServerProcess, message: str) -> int:
    try:
        process.stderr.write(f"Error: {message}\n".encode("utf-8"))
    except (OSError, asyncssh.Error):
        pass
    return EXIT_FAILED
