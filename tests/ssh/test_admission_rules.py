"""Issue 27's rules for sshfwup/ssh/admission.py and gate.py, with a fake clock (no sockets).

With the real OpenSSH client: tests/ssh/test_admission_clients.py.
"""

from __future__ import annotations

import logging
import struct

import pytest
from test_admission import World

from sshfwup.ssh.admission import Refused, StartupLimits
from sshfwup.ssh.gate import _Announcer, disconnect_packet


def test_a_burst_refused_by_the_server_leaves_no_penalty() -> None:
    w = World(StartupLimits(per_source=3, penalty_min=2.0))
    for i in range(3):
        w.connect(f"a{i}", "10.0.0.1", silent=False)
    for _ in range(27):  # the server's own limit: not the client's doing
        with pytest.raises(Refused) as refused:
            w.connect("more", "10.0.0.1")
        assert refused.value.queueable
    assert w.admission._penalties == {}
    assert refused.value.told() == "too many unauthenticated connections from your address; try again in 5 s"


def test_a_penalty_runs_out_on_time_however_often_the_client_knocks() -> None:
    w = World(StartupLimits(start=100, full=100, per_source=100, noauth_penalty=7.5, penalty_min=10.0))
    for _ in range(2):
        w.admission.leave(w.connect("probe", "10.0.0.9"))  # 15 s of penalty: refused for 5 s
    stated = None
    while w.now < 30:
        try:
            w.connect("probe", "10.0.0.9", silent=False)
            break
        except Refused as e:
            assert not e.queueable
            stated = e.retry_after if stated is None else stated
        w.now += 0.25
    assert stated == 5.0 and w.now == 5.25  # knocked 21 times; admitted when it said


def test_penalties_are_bounded() -> None:
    w = World(StartupLimits(start=1000, full=1000, per_source=1000, penalty_min=1000.0, penalty_max=60.0))
    for _ in range(500):
        w.admission.leave(w.connect("probe", "10.0.0.9"))
    assert w.admission._penalties["10.0.0.9"] == 60.0


def test_exempt_networks_are_never_penalised() -> None:
    limits = StartupLimits(per_source=100, penalty_min=2.0, penalty_exempt=("10.1.0.0/16", "2001:db8::/48"))
    w = World(limits)
    for address in ("10.1.2.3", "::ffff:10.1.2.3", "2001:db8:0:7::1"):
        for _ in range(5):
            w.admission.leave(w.connect("office", address))
    assert w.admission._penalties == {}
    for _ in range(2):
        w.admission.leave(w.connect("other", "10.2.0.1"))
    assert "10.2.0.1" in w.admission._penalties


def test_connections_closed_while_shutting_down_are_not_penalised() -> None:
    w = World(StartupLimits(per_source=100, penalty_min=1.0))
    tickets = [w.connect(f"c{i}", "10.0.0.1") for i in range(5)]
    w.admission.closing = True
    for ticket in tickets:
        w.admission.leave(ticket)
    assert w.admission._penalties == {}


def test_a_queued_client_takes_the_place_of_its_own_sources_silent_connection() -> None:
    w = World(StartupLimits(per_source=3, silent_grace=1.0))
    for i in range(3):
        w.connect(f"silent{i}", "10.0.0.1")
    assert not w.admission.room("10.0.0.1")  # nobody silent for a second yet
    w.now = 1.5
    assert w.admission.room("10.0.0.1") and w.dropped == ["silent0"]
    w.connect("user", "10.0.0.1", silent=False)
    w.silent = {name: False for name in w.silent}  # everyone talks now: nobody to drop
    assert not w.admission.room("10.0.0.1")


def test_the_disconnect_message_is_an_ssh_packet() -> None:
    packet = disconnect_packet("try again in 5 s")
    length, padding = struct.unpack(">IB", packet[:5])
    assert len(packet) == 4 + length and len(packet) % 8 == 0 and padding >= 4
    payload = packet[5 : 4 + length - padding]
    assert payload[0] == 1 and struct.unpack(">I", payload[1:5])[0] == 12  # DISCONNECT, too many connections
    assert payload[9 : 9 + struct.unpack(">I", payload[5:9])[0]] == b"try again in 5 s"


def test_refusals_are_logged_once_per_source_and_interval(caplog: pytest.LogCaptureFixture) -> None:
    announce = _Announcer(interval=3600)
    with caplog.at_level(logging.WARNING, logger="sshfwup.ssh.gate"):
        for _ in range(100):
            announce.say("10.0.0.1", "refused", "refused connections from 10.0.0.1: full")
        announce.say("10.0.0.2", "refused", "refused connections from 10.0.0.2: full")
    assert [r.getMessage() for r in caplog.records] == [
        "refused connections from 10.0.0.1: full", "refused connections from 10.0.0.2: full"
    ]
