"""The SSH side: listener, authentication, and what each kind of session may do.

Allowed: the ``fwup`` subsystem (raw ``.fw`` on stdin), SFTP (a virtual upload-only filesystem),
``scp -t`` (legacy scp uploads), and the device commands in :mod:`sshfwup.commands`.
Refused: passwords, keyboard-interactive, host-based auth, shells, ptys, other exec commands,
port/agent/X11 forwarding.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import asyncssh

from . import commands
from .config import Config
from .device import Device
from .report import Report
from .scp import run_scp_sink
from .sftp import FirmwareSFTPServer
from .update import EXIT_FAILED, Update, UpdateError, UpdateRefused, Uploader

log = logging.getLogger(__name__)

__all__ = ["FirmwareServer", "load_or_create_host_key"]

ONLY = (
    "this device accepts firmware uploads only: `cat app.fw | ssh -s HOST fwup`, scp/sftp to HOST:/fwup, "
    "or the commands: " + ", ".join(commands.NAMES)
)


FORWARDING_REFUSED = "port forwarding is not allowed on this device (firmware uploads and device commands only)"


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The server's ed25519 host key, generated on first start and stored mode 0600."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("host key %s is readable by others (mode %o); fixing to 0600", path, mode)
            os.chmod(path, 0o600)
        return asyncssh.read_private_key(str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    # Create the file 0600 from the start: write_private_key would leave it 0644 for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    Path(f"{path}.pub").write_bytes(key.export_public_key())
    log.info("generated host key %s (%s)", path, key.get_fingerprint())
    return key


class _Connection(asyncssh.SSHServer):
    """Per-connection policy: who may log in, what they may open."""

    def __init__(self, app: "FirmwareServer") -> None:
        self._app = app
        self._conn: asyncssh.SSHServerConnection | None = None
        self._keys: asyncssh.SSHAuthorizedKeys | None = None
        self._peer = "?"

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self._app.connections += 1
        if self._app.connections > self._app.config.server.max_connections:
            log.warning("refusing connection from %s: %d connections open", self._peer, self._app.connections - 1)
            conn.set_extra_info(sshfwup_refused=True)
        else:
            log.info("connection from %s", self._peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._app.connections -= 1
        log.info("connection from %s closed%s", self._peer, f": {exc}" if exc else "")

    def begin_auth(self, username: str) -> bool:
        assert self._conn is not None
        if self._conn.get_extra_info("sshfwup_refused"):
            self._conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, "too many connections; try again later")
            return True
        # Re-read per connection: adding a key needs no restart.
        self._keys = self._app.read_authorized_keys()
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        assert self._conn is not None
        host, _ = (self._conn.get_extra_info("peername") or ("", 0))[:2]
        ok = self._keys is not None and self._keys.validate(key, host, host) is not None
        fp = key.get_fingerprint()
        if ok:
            self._conn.set_extra_info(sshfwup_fingerprint=fp)
            log.info("accepted key %s for %s from %s", fp, username, self._peer)
        else:
            log.warning("rejected unknown key %s for %s from %s", fp, username, self._peer)
        return ok

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
        self.connections = 0
        self._listener: asyncssh.SSHAcceptor | None = None

    def read_authorized_keys(self) -> asyncssh.SSHAuthorizedKeys:
        keys = asyncssh.SSHAuthorizedKeys()
        for path in self.config.server.authorized_keys:
            try:
                keys.load(path.read_text())
            except FileNotFoundError:
                log.warning("authorized_keys file %s does not exist", path)
            except (OSError, ValueError) as e:
                log.error("cannot read authorized_keys %s: %s", path, e)
        return keys

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        cfg = self.config.server
        host_key = load_or_create_host_key(cfg.host_key)
        self._listener = await asyncssh.create_server(
            functools.partial(_Connection, self),
            cfg.listen,
            cfg.port,
            server_host_keys=[host_key],
            process_factory=self._handle,
            sftp_factory=functools.partial(FirmwareSFTPServer, device=self.device, tg=tg),
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
            reuse_address=True,
        )
        log.info("listening on %s:%d (host key %s)", cfg.listen, self.port, host_key.get_fingerprint())

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._listener.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            await self._listener.wait_closed()
            self._listener = None

    # --- sessions --------------------------------------------------------------------------

    async def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        uploader = _uploader(process)
        try:
            if process.subsystem == "fwup":
                status = await self._fwup_subsystem(process, uploader)
            elif process.subsystem:
                log.warning("refused subsystem %r from %s", process.subsystem, uploader)
                status = _refuse(process, f"unknown subsystem {process.subsystem!r}; {ONLY}")
            elif process.command is None:
                log.warning("refused a shell from %s", uploader)
                status = _refuse(process, f"no shell here; {ONLY}")
            elif process.command.startswith("scp "):
                status = await run_scp_sink(process, self.device, _with(uploader, "scp -O"))
            else:
                status = await commands.run(process, self.device, uploader)
        except Exception:
            log.exception("session from %s failed", uploader)
            status = _refuse(process, "internal error; see the device log")
        try:
            process.exit(status)
        except (OSError, asyncssh.Error):
            pass

    async def _fwup_subsystem(self, process: asyncssh.SSHServerProcess, uploader: Uploader) -> int:
        """``cat app.fw | ssh -s HOST fwup``: raw bytes in, fwup's text + our verdict out."""

        async def out(text: str) -> None:
            process.stdout.write(text.encode("utf-8"))

        report = Report(out)
        chan = process.channel
        chunk = max(chan.get_recv_window(), 65536)  # small reads would defeat flow control
        idle = self.config.server.idle_timeout
        try:
            async with Update(self.device, uploader, report) as update:
                while True:
                    try:
                        with anyio.fail_after(idle):
                            data = await process.stdin.read(chunk)
                    except TimeoutError:
                        update.abort(f"no data for {idle:.0f} s")
                        raise UpdateError(f"no data for {idle:.0f} s; upload aborted") from None
                    except (asyncssh.Error, OSError, EOFError) as e:
                        update.abort(f"connection lost: {e}")
                        log.warning("upload from %s interrupted: %s", uploader, e)
                        return EXIT_FAILED
                    if not data:
                        if chan.is_closing():
                            # a polite disconnect also reads as EOF: never treat it as a complete upload
                            update.abort("the client disconnected before finishing the upload")
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


def _uploader(process: asyncssh.SSHServerProcess) -> Uploader:
    conn = process.get_extra_info("connection")
    peer = process.get_extra_info("peername")
    transport = f"ssh -s {process.subsystem}" if process.subsystem else (process.command or "shell").split(" ")[0]
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
