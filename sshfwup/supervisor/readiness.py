"""Is an instance ready: it says so or passes its probe, and it accepts on the sockets clients use.

Readiness: ``notify`` waits for ``READY=1`` on a notify socket private to the instance.
``http`` and ``tcp`` probe a private listening socket (127.0.0.1, passed last, named ``health``):
a probe through the shared socket could be answered by the *old* version during an overlap. The
app must therefore serve every socket it is given — except for ``http`` when the first TCP
socket is on the reuseport path: the probe then goes through the public address to the
instance's own copy of that socket (the reuseport program routes the probe's source port there),
so an app serving only fd 3 (uvicorn ``--fd 3``) can be probed too. The ``health`` socket is
passed all the same, so that LISTEN_FDS does not depend on the kernel. ``http``: ``GET
ready_path`` answers 2xx. ``tcp``: the app accepted the probe connection — seen as the private
listener's accept queue (``TCP_INFO``) emptying again; on loopback the kernel queues the
connection before ``connect()`` returns.

Health is proved on the sockets clients use, not announced: in every readiness mode an instance
is ready only once it has also accepted a probe connection on each of its public TCP sockets
(:func:`listeners.accept_probe`), within ``ready_timeout`` — an app that sends READY=1 but
listens on a port of its own is not ready. A probe is sent only where no other instance could
accept it: to the instance's own socket on the reuseport paths (routed there by the program,
before the hand-over, while the old version still serves everyone else); on the shared path only
while no other instance runs — during an overlap that means once the old version drained, before
the swap completes (a failure then starts the old version again). UNIX sockets have no accept
queue to watch: there READY=1 (or the private probe) is all the proof.

The same probes make the health checks (:mod:`sshfwup.supervisor.health`).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

import anyio

from sshfwup.config import AppConfig

from . import probes
from .errors import NotReady
from .instance import LOGGER, Child, Roster, seconds
from .launcher import Launcher
from .listeners import Listener, ListenerError

__all__ = ["Readiness"]

log = logging.getLogger(LOGGER)

_PROBE_RETRY = 0.05


class Readiness:
    """Waits until an instance is ready, and probes it: on its private socket, and on each public
    socket only it can accept from."""

    def __init__(
        self,
        config: AppConfig,
        roster: Roster,
        listeners: tuple[Listener, ...],
        launcher: Launcher,
        *,
        on_ready: Callable[[], None],
    ) -> None:
        """``on_ready``: called the moment an instance is ready (a version serves again)."""
        self._config = config
        self._roster = roster
        self._listeners = listeners
        self._launcher = launcher
        self._on_ready = on_ready

    async def wait_ready(self, child: Child) -> None:
        """Return once ``child`` is ready — it said so (or passed its probe), and accepted a probe
        connection on each of its public sockets; else stop it and raise NotReady (it exited, or
        time ran out)."""
        config = self._config
        outcome: list[str | None] = []  # the first finisher decides
        last_probe = [""]
        unproven: list[tuple[Listener, float]] = []  # the public socket it has yet to accept on

        async def exits() -> None:
            await child.exited.wait()
            # The STATUS= of an instance that never got ready tells why (the exec shim sends one)
            status = f" ({child.status})" if child.status else ""
            outcome.append(f"{child.describe_exit()} before it became ready{status}")
            tasks.cancel_scope.cancel()

        async def becomes_ready() -> None:
            if config.ready == "notify":
                await child.ready.wait()
            else:
                while (problem := await self.probe(child, timeout=None)) is not None:
                    last_probe[0] = problem
                    await anyio.sleep(_PROBE_RETRY)
            said_ready = time.monotonic() - child.started_at
            # READY=1 or a private probe proves nothing about the sockets clients connect to.
            for listener, sock in self.public_checks(child):
                unproven[:] = [(listener, said_ready)]
                problem = await self.accept_probe(listener, sock, timeout=None)
                if problem is not None:
                    outcome.append(problem)
                    tasks.cancel_scope.cancel()
                    return
            unproven.clear()
            outcome.append(None)
            tasks.cancel_scope.cancel()

        with anyio.move_on_after(config.ready_timeout):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(exits)
                tasks.start_soon(becomes_ready)
        if not outcome:
            if unproven:
                listener, said_ready = unproven[0]
                announced = "said READY=1" if config.ready == "notify" else "passed its readiness probe"
                hint = (
                    f": it {announced} after {said_ready:.2f} s, but accepted no connection on its public socket"
                    f" {listener.name} ({listener.address}) — an app must serve the sockets it is given"
                    " (LISTEN_FDS), not listen on its own"
                )
            elif last_probe[0]:
                hint = f" (last probe: {last_probe[0]})"
            else:
                hint = self._silence(child)
            child.failure = f"{child.version} did not become ready within {seconds(config.ready_timeout)}{hint}"
            await self._launcher.stop(child)
            raise NotReady(f"did not become ready within {seconds(config.ready_timeout)}{hint}")
        if outcome[0] is not None:
            child.failure = f"{child.version} {outcome[0]}"
            await self._launcher.stop(child)
            raise NotReady(outcome[0])
        child.ready_at = time.monotonic()
        self._on_ready()  # a version serves again (the stand-in was stood down before its start)

    async def probe(self, child: Child, *, timeout: float | None) -> str | None:
        """One readiness/health probe on the instance's private socket: None if it passed."""
        assert child.health is not None
        port = child.health.getsockname()[1]
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            try:
                if self._config.ready == "http":
                    steered = self._probe_target(child)
                    if steered is None:
                        return await probes.http_probe(port, self._config.ready_path)
                    listener, sock = steered
                    with listener.probe_route(sock) as route:
                        return await probes.http_probe(port, self._config.ready_path, route=route)
                return await probes.tcp_probe(child.health, port)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return "connection closed without a response"
            except (OSError, ListenerError) as e:
                return f"connection failed: {getattr(e, 'strerror', None) or e}"
        return f"no answer within {seconds(timeout or 0)}"

    def _silence(self, child: Child) -> str:
        """Why a readiness probe that never returned got nowhere, for the failure's reason."""
        if self._config.ready == "tcp":
            return " (its private health socket accepted no connection)"
        if self._config.ready == "http":
            steered = self._probe_target(child)
            where = (f"its public socket {steered[0].name} ({steered[0].address})" if steered
                     else "its private health socket")  # fmt: skip
            return f" (no answer to GET {self._config.ready_path} through {where})"
        return ""

    def public_checks(self, child: Child) -> list[tuple[Listener, socket.socket]]:
        """``child``'s public sockets where a probe connection can only be accepted by ``child``:
        TCP sockets no other running instance holds — its own on a steered listener; a shared one
        while it is the only instance (during an overlap on the shared path the old version could
        accept the probe: there the proof waits until the old one drained). Not the listener an http probe already goes through (its answer proves more),
        nor UNIX sockets (no accept queue to watch)."""
        http_target = self._probe_target(child) if self._config.ready == "http" else None
        others = self._roster.others(child)
        return [
            (listener, sock)
            for listener, sock in zip(self._listeners, child.sockets)
            if listener.spec.kind == "tcp"
            and (http_target is None or listener is not http_target[0])
            and not any(sock in other.sockets for other in others)
        ]

    async def accept_probe(
        self, listener: Listener, sock: socket.socket, *, timeout: float | None, stall: bool = False
    ) -> str | None:
        """A probe connection to ``sock`` (see listeners.accept_probe): None once it was accepted.
        ``stall``: a health check — the probe may wait behind busy workers as long as the queue
        moves; ``[app] stall_timeout`` without any accept there means the app stopped accepting."""
        what = f"its public socket {listener.name} ({listener.address})"
        stall_timeout = self._config.stall_timeout if stall else None
        with anyio.move_on_after(timeout if timeout is not None else float("inf")):
            try:
                with listener.probe_connection(sock) as route:
                    await probes.accept_probe(sock, route, stall_timeout=stall_timeout)
                return None
            except probes.AcceptStalled as e:
                return f"stopped accepting connections on {what}: {e}"
            except (OSError, ListenerError) as e:
                return f"could not be probed on {what}: {getattr(e, 'strerror', None) or e}"
        return f"stopped accepting connections on {what}: a probe connection waited {seconds(timeout or 0)} unaccepted"

    def _probe_target(self, child: Child) -> tuple[Listener, socket.socket] | None:
        """The first steered listener and ``child``'s socket there: where http probes go."""
        for listener, sock in zip(self._listeners, child.sockets):
            if listener.steered and sock in listener.members:
                return listener, sock
        return None
