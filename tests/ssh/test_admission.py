"""Pre-authentication limits (sshfwup/ssh/admission.py) with a fake clock and a fake dice.

The same limits against real sockets and the real OpenSSH client: tests/ssh/test_server.py.
"""

from __future__ import annotations

import pytest

from sshfwup.ssh.admission import Admission, Refused, StartupLimits, Ticket, source_of


class World:
    def __init__(self, limits: StartupLimits, dice: float = 0.99) -> None:
        self.now = 0.0
        self.dice = dice
        self.admission = Admission(limits, clock=lambda: self.now, chance=lambda: self.dice)
        self.dropped: list[str] = []
        self.silent: dict[str, bool] = {}

    def connect(self, name: str, address: str, *, silent: bool = True) -> Ticket:
        self.silent[name] = silent
        return self.admission.arrive(
            address, silent=lambda: self.silent[name], drop=lambda: self.dropped.append(name)
        )


def test_sources() -> None:
    assert source_of("192.0.2.7") == "192.0.2.7"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("not an address") == "not an address"


def test_per_source_limit_refuses_at_once_and_frees_on_leave_or_login() -> None:
    w = World(StartupLimits(start=10, rate=30, full=60, per_source=3))
    tickets = [w.connect(f"a{i}", "10.0.0.1") for i in range(3)]
    with pytest.raises(Refused, match="3 unauthenticated connections from 10.0.0.1"):
        w.connect("a3", "10.0.0.1")
    w.connect("b0", "10.0.0.2")  # another source is not affected
    w.admission.leave(tickets[0])
    w.connect("a4", "10.0.0.1")
    w.admission.authenticated(tickets[1])
    w.connect("a5", "10.0.0.1")
    w.admission.leave(tickets[1])  # leaving after login: counted once only
    assert w.admission.pending == 4 and w.admission.refused == 1


def test_max_startups_random_early_drop_and_full() -> None:
    limits = StartupLimits(start=2, rate=50, full=4, per_source=100)
    w = World(limits, dice=0.49)  # below 50%: dropped at the first step already
    w.connect("a", "10.0.0.1", silent=False)
    w.connect("b", "10.0.0.2", silent=False)
    with pytest.raises(Refused, match="probability 50%"):
        w.connect("c", "10.0.0.3")
    w.dice = 0.51
    w.connect("c", "10.0.0.3", silent=False)  # 2 pending: p = 50%, 0.51 passes
    w.dice = 0.74
    with pytest.raises(Refused, match="probability 75%"):  # 3 pending: p = 75%
        w.connect("d", "10.0.0.4")
    w.dice = 0.99
    w.connect("d", "10.0.0.4", silent=False)
    with pytest.raises(Refused, match="max_startups full = 4"):
        w.connect("e", "10.0.0.5")
    assert w.dropped == []


def test_silent_then_stalled_connections_make_room_oldest_first_after_their_grace() -> None:
    w = World(StartupLimits(start=3, rate=100, full=3, per_source=100, silent_grace=1.0))
    w.connect("talker", "10.0.0.1", silent=False)
    w.connect("quiet1", "10.0.0.2")
    w.now = 0.5
    w.connect("quiet2", "10.0.0.3")
    w.now = 0.9  # nobody has been silent for a second yet: the newcomer is refused
    with pytest.raises(Refused):
        w.connect("new1", "10.0.0.4")
    w.now = 1.2  # quiet1 has: it goes, the newcomer stays
    w.connect("new2", "10.0.0.5", silent=False)
    assert w.dropped == ["quiet1"]
    w.now = 1.6  # quiet2 is next; the talker is not silent
    w.connect("new3", "10.0.0.6", silent=False)
    assert w.dropped == ["quiet1", "quiet2"] and w.admission.shed == 2
    w.now = 4.5  # every connection talks and is younger than 5 s: nobody to shed
    with pytest.raises(Refused):
        w.connect("new4", "10.0.0.7")
    w.now = 5.2  # the talker has not logged in after 5 s (stall_grace): it goes
    w.connect("new5", "10.0.0.8", silent=False)
    assert w.dropped == ["quiet1", "quiet2", "talker"] and w.admission.pending == 3


def test_a_legitimate_client_gets_in_past_fifty_silent_connections() -> None:
    """The scenario of tests/ssh/test_server.py in numbers: 50 silent connections from 50 addresses,
    then clients that talk. With sshd's rule alone every one of them would be refused here."""
    w = World(StartupLimits(start=10, rate=30, full=60, per_source=3), dice=0.0)  # every drop happens
    admitted = 0
    for i in range(50):
        try:
            w.connect(f"q{i}", f"10.0.1.{i}")
            admitted += 1
        except Refused:
            pass
    assert admitted == 10 and w.admission.refused == 40
    w.now = 5.0
    users = [w.connect(f"user{i}", f"192.0.2.{i}", silent=False) for i in range(10)]  # all in handshake
    assert len(w.dropped) == 10 and all(name.startswith("q") for name in w.dropped)
    with pytest.raises(Refused):  # what is left are young talkers: they are not shed
        w.connect("user10", "192.0.2.10", silent=False)
    for ticket in users:
        w.admission.authenticated(ticket)
    assert w.admission.pending == 0
    w.connect("user11", "192.0.2.11", silent=False)


def test_sources_whose_connections_never_try_to_log_in_are_penalised() -> None:
    limits = StartupLimits(start=100, rate=30, full=100, per_source=100, noauth_penalty=1.0, penalty_min=3.0)
    w = World(limits)
    for _ in range(5):  # a client that tries a key (even a wrong one) is never penalised
        t = w.connect("user", "192.0.2.1", silent=False)
        w.admission.trying(t)
        w.admission.leave(t)
    for _ in range(3):  # three connections that never asked to log in: 3 s of penalty
        w.admission.leave(w.connect("probe", "10.0.0.9"))
    for _ in range(5):  # knocking again is refused but adds nothing (issue 27: it used to renew it)
        with pytest.raises(Refused, match="10.0.0.9 is penalised for 3 s more") as refused:
            w.connect("probe", "10.0.0.9")
    assert refused.value.told() == (
        "your address is penalised (its connections ended without trying to log in); try again in 1 s"
    )
    w.connect("user", "192.0.2.1", silent=False)  # other sources are not affected
    w.now = 0.05  # 2.95 s left: below the minimum, admitted again on time
    w.connect("probe", "10.0.0.9")
    w.now = 1000.0
    assert w.admission._penalties["10.0.0.9"] < w.now  # penalties run out


def test_shed_connections_count_as_penalties_and_the_table_is_bounded() -> None:
    w = World(StartupLimits(start=1, rate=100, full=1, per_source=100, penalty_min=2.0, penalty_sources=10))
    w.connect("quiet0", "10.0.2.0")
    for i in range(1, 30):
        w.now += 2.0  # each new one sheds the previous one (silent for 2 s)
        w.connect(f"quiet{i}", f"10.0.2.{i}")
    assert w.admission.shed == 29 and len(w.admission._penalties) <= 10
