"""The app's sockets across versions: which sockets an instance starts on, where new connections go, the hand-over.

How a TCP socket goes from one version to the next — its *socket path*, see
:mod:`sshfwup.supervisor.listeners` — is ``reuseport`` (``reuseport+migrate`` with
``net.ipv4.tcp_migrate_req = 1``) wherever the kernel takes a reuseport program: each version
gets a listening socket of its own on the same address, and the supervisor steers new
connections to one of them. UNIX sockets, kernels without the program and ``Supervisor(...,
steer=False)`` use the ``shared`` path: one socket for every version.

The *hand-over* (:meth:`Steering.hand_over`): steer new connections to the new version's
sockets, let the old version accept what is already queued on its own, and wait until its queues
stayed empty for a short quiet period; only then does the old version get SIGTERM. A draining
server therefore never holds a connection whose request it has not read yet (servers close those
on shutdown: "connection reset" for the client). On the shared path there is nothing to hand
over: both versions accept from one queue until the old one drains.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable

import anyio

from .errors import NotReady
from .instance import LOGGER, Child, Roster
from .listeners import Listener, ListenerError

__all__ = ["Steering"]

log = logging.getLogger(LOGGER)

# The hand-over: the old version's queues must stay empty this long before it gets SIGTERM, so
# that it has read the requests of the connections it accepted last; bounded for an old version
# that stopped accepting.
_HANDOVER_QUIET = 0.25
_HANDOVER_LIMIT = 5.0
_HANDOVER_POLL = 0.01


class Steering:
    """The sockets of each version on every listener, and where new connections go."""

    def __init__(self, listeners: tuple[Listener, ...], roster: Roster) -> None:
        self._listeners = listeners
        self._roster = roster

    def serving_sockets(self) -> tuple[socket.socket, ...]:
        """The sockets that receive new connections now: what the current version (re)starts on."""
        return tuple(listener.sock for listener in self._listeners)

    def fresh_sockets(self) -> tuple[socket.socket, ...]:
        """Sockets for a new version: its own on a steered listener, the shared one otherwise."""
        created: list[tuple[Listener, socket.socket]] = []
        try:
            for listener in self._listeners:
                created.append((listener, listener.instance_socket()))
        except ListenerError as e:
            for listener, sock in created:
                listener.release(sock)
            raise NotReady(f"could not be started: {e}") from e
        return tuple(sock for _, sock in created)

    def steer_back(self, sockets: tuple[socket.socket, ...]) -> None:
        """Steer back (rollback): a failure is logged, the rollback goes on."""
        for listener, sock in zip(self._listeners, sockets, strict=True):
            try:
                listener.steer_to(sock)
            except ListenerError as e:
                log.error("%s", e)

    def socket_path(self) -> str:
        """"reuseport+migrate", "reuseport" or "shared" ("name=path, ..." when the sockets differ)."""
        paths = [listener.path for listener in self._listeners]
        if not paths:
            return "none"
        if len(set(paths)) == 1:
            return paths[0]
        return ", ".join(f"{listener.name}={path}" for listener, path in zip(self._listeners, paths))

    async def hand_over(
        self,
        old: Child,
        sockets: tuple[socket.socket, ...],
        say: Callable[[str], Awaitable[None]],
        *,
        taker: str,
        new: Child | None = None,
    ) -> float:
        """Steer new connections to ``sockets``; return once ``old`` has accepted everything that
        was queued for it and its queues stayed empty for ``_HANDOVER_QUIET`` (it keeps serving
        meanwhile). Raises NotReady if ``new`` exits meanwhile. Returns the seconds it took."""
        moves = [(listener, mine, theirs)
                 for listener, mine, theirs in zip(self._listeners, old.sockets, sockets, strict=True)
                 if mine is not theirs]  # fmt: skip
        if not moves:
            return 0.0  # shared path: both versions accept from one queue until the old one drains
        began = time.monotonic()
        try:
            for listener, _, theirs in moves:
                listener.steer_to(theirs)
        except ListenerError as e:
            raise NotReady(f"could not take over new connections: {e}") from e
        await say(f"new connections {taker} now ({self.socket_path()})")
        quiet_since: float | None = None
        while not old.exited.is_set():
            now = time.monotonic()
            if new is not None and new.exited.is_set():
                raise NotReady(f"{new.describe_exit()} while taking over new connections")
            if any(listener.queued(mine) for listener, mine, _ in moves):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= _HANDOVER_QUIET:
                break
            if now - began >= _HANDOVER_LIMIT:
                log.warning("%s (pid %d) still had connections queued %g s after the hand-over",
                            old.version, old.pid, _HANDOVER_LIMIT)  # fmt: skip
                break
            await anyio.sleep(_HANDOVER_POLL)
        seconds = time.monotonic() - began
        await say(f"{old.version} took the last connection queued for it; {seconds:.2f} s after the hand-over")
        return seconds

    def release_unused(self) -> None:
        """Release every socket that receives no new connections and no instance holds any more."""
        held = {id(sock) for child in self._roster.children for sock in child.sockets}
        for listener in self._listeners:
            for sock in listener.members:
                if sock is not listener.sock and id(sock) not in held:
                    try:
                        listener.release(sock)
                    except ListenerError as e:  # released all the same; steering not updated
                        log.error("%s", e)
