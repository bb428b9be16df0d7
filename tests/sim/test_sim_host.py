"""The uploader's side of a simulated device (sshfwup/sim/host.py)."""

from __future__ import annotations

import socket

from sshfwup.sim.host import _ephemeral_low, free_port


def test_free_ports_lie_below_the_ephemeral_range_and_never_repeat() -> None:
    # A port from the ephemeral range can be taken by a client's outgoing connection (hey's
    # keep-alive connections) before the server binds it: a bench once saw a device's SSH server
    # fail to bind 58 times in a row.
    low = _ephemeral_low()
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == 100
    assert all(1024 <= p < low for p in ports), (low, sorted(ports)[-3:])
    with socket.socket() as listener:  # and a server can bind it
        listener.bind(("127.0.0.1", ports[0]))
        listener.listen()
