"""The service manager's end of sd_notify, as systemd's ``NOTIFY_SOCKET`` for a ``Type=notify``
service: the machine learns who sent each message, so only the server's own pid counts
(``NotifyAccess=main``)."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import anyio

__all__ = ["NotifySocket"]


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket that learns each sender's pid."""

    def __init__(self, device_dir: Path) -> None:
        path = device_dir / "machine.notify"
        if len(os.fsencode(path)) >= 100:  # sun_path holds 108 bytes; stay clear of it
            path = Path("/tmp") / f"sshfwup-sim-{os.getpid()}.notify"
        self.path = path
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    async def receive(self) -> tuple[int | None, str]:
        """(sender pid, message text) of the next datagram."""
        creds_size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while True:
            await anyio.wait_readable(self.sock)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, creds_size)
            except BlockingIOError:
                continue
            pid = None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
            return pid, data.decode(errors="replace")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)
