"""Who may start an SSH handshake: limits on unauthenticated connections, like sshd's.

Before a client has authenticated it costs the device memory and CPU and proves nothing. So:

- **per source** (sshd's ``PerSourceMaxStartups``): at most ``per_source`` unauthenticated
  connections from one address (an IPv6 /64, where one host has many addresses); more are
  refused at once. A flood from one host cannot crowd anyone else out.
- **overall** (sshd's ``MaxStartups start:rate:full``): from ``start`` unauthenticated
  connections on, a new one is refused with probability ``rate``% rising linearly to 100% at
  ``full`` — **but first**, an older connection that shows it is not logging in is dropped
  instead and the newcomer admitted: the oldest one that has stayed *silent* (no SSH version
  line) for ``silent_grace`` seconds, else the oldest one still not logged in after
  ``stall_grace`` seconds. A real client sends its version line within a round trip and logs
  in within a few; connections that do neither are what an attacker parks to lock others out
  (sshd would refuse the newcomer, i.e. the legitimate user).
- **penalties** (sshd's ``PerSourcePenalties``, its ``noauth`` kind): a connection that ends
  without ever trying to log in (silent, stalled, shed, timed out, or refused) adds
  ``noauth_penalty`` seconds to its source; a source with ``penalty_min`` seconds or more is refused at once until
  they run out (at most ``penalty_max`` ahead). A flood that keeps renewing its connections
  from many addresses, so that none ever looks old, blocks itself within seconds; a client
  that tries a key — even a wrong one — and health checks now and then never get there.
- the grace time to authenticate (``login_timeout``) and the number of *authenticated*
  connections (``max_connections``) are enforced by the server (:mod:`sshfwup.ssh.server`).

Pure bookkeeping with an injectable clock and random source: the caller closes what it is told
to close.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Admission", "Refused", "StartupLimits", "Ticket", "source_of"]


@dataclass(frozen=True)
class StartupLimits:
    start: int = 10
    rate: int = 30  # percent
    full: int = 60
    per_source: int = 3
    silent_grace: float = 1.0  # seconds a connection may stay silent before it may be shed
    stall_grace: float = 5.0  # seconds a handshake may take before it may be shed (under pressure)
    noauth_penalty: float = 1.0  # seconds per connection that ended without trying to log in
    penalty_min: float = 10.0  # a source with at least this much penalty is refused
    penalty_max: float = 60.0
    penalty_sources: int = 4096  # sources remembered at most


class Refused(Exception):
    """A new connection is not admitted; the message says which limit (for the log)."""


@dataclass(eq=False)
class Ticket:
    """One unauthenticated connection."""

    source: str
    since: float
    silent: Callable[[], bool]  # still no SSH version line from the client?
    drop: Callable[[], None]  # close it now
    admitted: bool = field(default=True)
    tried: bool = field(default=False)  # the client asked to log in (right or wrong)


def source_of(address: str) -> str:
    """The unit a per-source limit counts: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Admission:
    def __init__(
        self,
        limits: StartupLimits,
        *,
        clock: Callable[[], float] = time.monotonic,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self.limits = limits
        self._clock = clock
        self._chance = chance
        self._pending: list[Ticket] = []  # oldest first
        self._penalties: dict[str, float] = {}  # source -> when its penalty runs out
        self.refused = 0
        self.shed = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def arrive(self, address: str, *, silent: Callable[[], bool], drop: Callable[[], None]) -> Ticket:
        """Admit a new connection (a Ticket) or raise Refused. May drop an older silent one."""
        limits, now = self.limits, self._clock()
        source = source_of(address)
        penalty = self._penalties.get(source, now) - now
        if penalty >= limits.penalty_min:
            self._refuse(source)
            raise Refused(
                f"{source} is penalised for {penalty:.0f} s more: its connections end without trying to log in"
            )
        same = sum(1 for t in self._pending if t.source == source)
        if same >= limits.per_source:
            self._refuse(source)
            raise Refused(f"{same} unauthenticated connections from {source} already (max_startups_per_source)")
        n = len(self._pending)
        if n >= limits.start:
            victim = next(
                (t for t in self._pending if now - t.since >= limits.silent_grace and t.silent()), None
            ) or next((t for t in self._pending if now - t.since >= limits.stall_grace), None)
            if victim is not None:
                self.leave(victim)
                self.shed += 1
                victim.drop()
            elif n >= limits.full:
                self._refuse(source)
                raise Refused(f"{n} unauthenticated connections (max_startups full = {limits.full})")
            else:
                p = limits.rate + (100 - limits.rate) * (n - limits.start) / max(1, limits.full - limits.start)
                if self._chance() * 100 < p:
                    self._refuse(source)
                    raise Refused(f"{n} unauthenticated connections: dropped with probability {p:.0f}% (max_startups)")
        ticket = Ticket(source, now, silent, drop)
        self._pending.append(ticket)
        return ticket

    def trying(self, ticket: Ticket) -> None:
        """The client asked to log in: whatever happens next, it was not just taking up room."""
        ticket.tried = True

    def authenticated(self, ticket: Ticket) -> None:
        """The connection logged in: it no longer counts here."""
        ticket.tried = True
        self._remove(ticket)

    def leave(self, ticket: Ticket) -> None:
        """The connection closed (at any point)."""
        if ticket.admitted and not ticket.tried:
            self._penalise(ticket.source)
        self._remove(ticket)

    def _refuse(self, source: str) -> None:
        # a refused connection did not log in either: a source that keeps knocking stays out
        self.refused += 1
        self._penalise(source)

    def _penalise(self, source: str) -> None:
        limits, now = self.limits, self._clock()
        until = max(self._penalties.get(source, now), now) + limits.noauth_penalty
        self._penalties[source] = min(until, now + limits.penalty_max)
        if len(self._penalties) > limits.penalty_sources:
            self._penalties = {s: t for s, t in self._penalties.items() if t > now}
            while len(self._penalties) > limits.penalty_sources:
                del self._penalties[min(self._penalties, key=self._penalties.__getitem__)]

    def _remove(self, ticket: Ticket) -> None:
        if ticket.admitted:
            ticket.admitted = False
            self._pending.remove(ticket)
