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
- **penalties** (sshd's ``PerSourcePenalties``, its ``noauth`` kind): an admitted connection that
  ends without ever trying to log in (silent, stalled, shed, timed out) adds ``noauth_penalty``
  seconds to its source; a source with ``penalty_min`` seconds or more is refused at once until
  it is below that again (at most ``penalty_max`` ahead). A flood that keeps renewing its
  connections from many addresses, so that none ever looks old, blocks itself within seconds; a
  client that tries a key — even a wrong one — and health checks now and then never get there.
  Only what the client did counts: a connection *this* server refused (a limit, a penalty) or
  closed while shutting down adds nothing, so a refused retry never renews a penalty and a
  burst the server itself turned away does not lock its address out (issue 27). Sources in
  ``penalty_exempt`` (sshd's ``PerSourcePenaltyExemptList``) are never penalised.
- the grace time to authenticate (``login_timeout``) and the number of *authenticated*
  connections (``max_connections``) are enforced by the server (:mod:`sshfwup.ssh.server`).

Refusals carry ``retry_after`` (what the client is told: :mod:`sshfwup.ssh.gate` sends it as an
SSH disconnect message, which ``ssh`` prints) and ``queueable`` (a start-up limit, not a penalty:
the gate may hold the connection until there is room, see :meth:`Admission.room`).

Pure bookkeeping with an injectable clock and random source: the caller closes what it is told
to close.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from collections.abc import Callable
from typing import NoReturn
from dataclasses import dataclass, field

__all__ = ["Admission", "Refused", "StartupLimits", "Ticket", "exempt_networks", "source_of"]


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
    penalty_exempt: tuple[str, ...] = ()  # networks never penalised (sshd's PerSourcePenaltyExemptList)


class Refused(Exception):
    """A new connection is not admitted; the message says which limit (for the log).

    ``retry_after``: seconds until the source may expect to get in (said to the client);
    ``queueable``: a start-up limit (room comes when a connection logs in or goes), not a penalty.
    """

    def __init__(self, message: str, *, source: str, retry_after: float, queueable: bool) -> None:
        super().__init__(message)
        self.source = source
        self.retry_after = retry_after
        self.queueable = queueable

    def told(self) -> str:
        """What the client is told (``ssh`` prints it as "Received disconnect ...: <this>")."""
        wait = max(1, math.ceil(self.retry_after))
        if self.queueable:
            return f"too many unauthenticated connections from your address; try again in {wait} s"
        return (f"your address is penalised (its connections ended without trying to log in); "
                f"try again in {wait} s")  # fmt: skip


@dataclass(eq=False)
class Ticket:
    """One unauthenticated connection."""

    source: str
    since: float
    silent: Callable[[], bool]  # still no SSH version line from the client?
    drop: Callable[[], None]  # close it now
    admitted: bool = field(default=True)
    tried: bool = field(default=False)  # the client asked to log in (right or wrong)
    exempt: bool = field(default=False)  # from penalty_exempt: never penalised


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


def exempt_networks(networks: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``penalty_exempt`` as networks (checked by :mod:`sshfwup.config`; ValueError otherwise)."""
    return tuple(ipaddress.ip_network(text, strict=False) for text in networks)


def _is_exempt(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


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
        self._exempt = exempt_networks(limits.penalty_exempt)
        self.refused = 0
        self.shed = 0
        self.closing = False  # shutting down: connections closed now are our doing, not theirs

    @property
    def pending(self) -> int:
        return len(self._pending)

    def arrive(self, address: str, *, silent: Callable[[], bool], drop: Callable[[], None]) -> Ticket:
        """Admit a new connection (a Ticket) or raise Refused. May drop an older silent one."""
        limits, now = self.limits, self._clock()
        source = source_of(address)
        penalty = self._penalties.get(source, now) - now
        if penalty >= limits.penalty_min:
            self.refused += 1
            raise Refused(
                f"{source} is penalised for {penalty:.0f} s more: its connections end without trying to log in",
                source=source, retry_after=penalty - limits.penalty_min, queueable=False,
            )  # fmt: skip
        same = sum(1 for t in self._pending if t.source == source)
        if same >= limits.per_source:
            self._refuse(source, f"{same} unauthenticated connections from {source} already (max_startups_per_source)")
        n = len(self._pending)
        if n >= limits.start:
            victim = self._victim(self._pending, now)
            if victim is not None:
                self.leave(victim)
                self.shed += 1
                victim.drop()
            elif n >= limits.full:
                self._refuse(source, f"{n} unauthenticated connections (max_startups full = {limits.full})")
            else:
                p = limits.rate + (100 - limits.rate) * (n - limits.start) / max(1, limits.full - limits.start)
                if self._chance() * 100 < p:
                    self._refuse(source, f"{n} unauthenticated connections: dropped with probability {p:.0f}% (max_startups)")
        ticket = Ticket(source, now, silent, drop, exempt=_is_exempt(address, self._exempt))
        self._pending.append(ticket)
        return ticket

    def room(self, address: str) -> bool:
        """Is there a place for a waiting client from ``address`` (one that has shown it speaks
        SSH: it sent its version line)? Makes one the way :meth:`arrive` does for a newcomer — by
        dropping the oldest connection silent past ``silent_grace`` or stalled past
        ``stall_grace``, from its own source if that is what is full — but never by dice: a
        queued client is admitted to a free place or waits.
        """
        limits, now, source = self.limits, self._clock(), source_of(address)
        if self._penalties.get(source, now) - now >= limits.penalty_min:
            return False
        mine = [t for t in self._pending if t.source == source]
        for crowd, limit in ((mine, limits.per_source), (self._pending, limits.start)):
            if len(crowd) >= limit:
                victim = self._victim(crowd, now)
                if victim is None:
                    return False
                self.leave(victim)
                self.shed += 1
                victim.drop()
        return True

    def _victim(self, among: list[Ticket], now: float) -> Ticket | None:
        limits = self.limits
        return next(
            (t for t in among if now - t.since >= limits.silent_grace and t.silent()), None
        ) or next((t for t in among if now - t.since >= limits.stall_grace), None)

    def ended_silent(self, address: str) -> None:
        """A connection that waited in the queue ended without a word from the client (it
        closed, or stayed silent past ``silent_grace`` while its source's queue was full): it
        never started the handshake, which is the client's doing — a penalty, as if admitted."""
        if not self.closing and not _is_exempt(address, self._exempt):
            self._penalise(source_of(address))

    def trying(self, ticket: Ticket) -> None:
        """The client asked to log in: whatever happens next, it was not just taking up room."""
        ticket.tried = True

    def authenticated(self, ticket: Ticket) -> None:
        """The connection logged in: it no longer counts here."""
        ticket.tried = True
        self._remove(ticket)

    def leave(self, ticket: Ticket) -> None:
        """The connection closed (at any point)."""
        if ticket.admitted and not ticket.tried and not ticket.exempt and not self.closing:
            self._penalise(ticket.source)
        self._remove(ticket)

    def _refuse(self, source: str, why: str) -> NoReturn:
        # Not a penalty: the server turned it away, the client did nothing wrong (issue 27: a
        # burst refused by the per-source limit used to lock its own address out).
        self.refused += 1
        raise Refused(why, source=source, retry_after=self.limits.stall_grace, queueable=True)

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
