"""A TCP proxy on 127.0.0.1 between one SSH client and the device, that makes the network's
faults for tests/update/test_upload_matrix.py. The client and the server are the real ones
(OpenSSH's ssh/scp/sftp, ``sshfwup upload``, the device's server); only the path between them
is ours. It counts the bytes the client sends (the upload, encrypted: about the firmware's size
plus a few KiB of handshake) and, at a trigger, stops forwarding them.

- Until the device's update lock is taken, it forwards the client's bytes slowly (256 bytes per
  20 ms): so that "stop at the start" stops before the firmware's first bytes reach the device
  (the SSH clients send their first data as soon as the session is open, before the device has
  taken its lock and read a byte).
- ``pause``: client → server stops at the trigger (the server's answers still flow back).
- ``blackhole``: both directions stop (a cable pulled: no FIN, no RST, silence).
- ``resume(slow=...)``: forwarding goes on, at full speed or ``slow`` (a piece per interval).
- ``cut``: both sockets closed (what the device sees when the client's host goes away).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

CRAWL = (256, 0.02)  # bytes, seconds: before the device holds the lock
PIECE = 16384


@dataclass
class Trigger:
    """Where the client's bytes stop: once the lock is held and ``at`` bytes were forwarded."""

    at: int = 0


class FaultProxy:
    def __init__(self, target_port: int, lock_held: Callable[[], bool], trigger: Trigger) -> None:
        self._target = ("127.0.0.1", target_port)
        self._lock_held = lock_held
        self._trigger = trigger
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.up = 0  # client → server bytes forwarded
        self.paused = threading.Event()  # the trigger was reached: client → server stopped
        self.paused_at = 0.0
        self._up_go = threading.Event()
        self._down_go = threading.Event()
        self._up_go.set()
        self._down_go.set()
        self._slow: tuple[int, float] | None = None
        self._armed = False  # the lock was seen held
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    # --- control (from the test) -------------------------------------------------------------

    def blackhole(self) -> None:
        self._up_go.clear()
        self._down_go.clear()

    def resume(self, slow: tuple[int, float] | None = None) -> None:
        self._slow = slow
        self._up_go.set()
        self._down_go.set()

    def cut(self) -> None:
        self._closed.set()
        self._up_go.set()
        self._down_go.set()
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.cut()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- forwarding ------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        server = socket.create_connection(self._target)
        self._socks += [client, server]
        down = threading.Thread(target=self._forward_down, args=(server, client), daemon=True)
        self._threads.append(down)
        down.start()
        self._forward_up(client, server)

    def _forward_up(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                data = client.recv(max(PIECE, self._slow[0] if self._slow else 0))
                if not data:
                    break
                while data and not self._closed.is_set():
                    size = self._next_size()
                    piece, data = data[:size], data[size:]
                    self._up_go.wait()
                    if self._closed.is_set():
                        return
                    server.sendall(piece)
                    self.up += len(piece)
        except OSError:
            pass
        finally:
            self.cut()  # the client went: the device sees the connection end

    def _next_size(self) -> int:
        if not self._armed:
            self._armed = self._lock_held()
            if self._armed:
                self._trigger.at = max(self._trigger.at, self.up)
        if not self._armed:
            time.sleep(CRAWL[1])
            return CRAWL[0]
        if not self.paused.is_set():
            return max(1, min(PIECE, self._trigger.at - self.up)) if self._trigger.at > self.up else self._stop()
        if self._slow is not None:
            time.sleep(self._slow[1])
            return self._slow[0]
        return PIECE

    def _stop(self) -> int:
        self._up_go.clear()
        self.paused_at = time.monotonic()
        self.paused.set()
        return PIECE

    def _forward_down(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                data = server.recv(PIECE)
                if not data:
                    break
                self._down_go.wait()
                if self._closed.is_set():
                    return
                client.sendall(data)
        except OSError:
            pass
        finally:
            self.cut()
