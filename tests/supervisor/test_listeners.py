"""sshfwup.supervisor.listeners: reuseport groups steered by a classic BPF program, on real sockets.

Where a connection went is read from the kernel: the accept queue of each listening socket.
Migration (``net.ipv4.tcp_migrate_req``) is a per-network-namespace setting: those tests run a
small script in a network namespace of their own (``unshare -n``), so that the host's setting is
neither needed nor touched.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshfwup.supervisor import listeners
from sshfwup.config import SocketSpec
from sshfwup.supervisor.listeners import Listener, ListenerError, bind_listeners


@pytest.fixture
def tcp() -> Iterator[Listener]:
    (listener,) = bind_listeners((SocketSpec("tcp", "127.0.0.1", 0, "web"),))
    try:
        yield listener
    finally:
        listener.close()


def port_of(listener: Listener) -> int:
    return int(listener.sock.getsockname()[1])


def connect(port: int, count: int = 1, *, host: str = "127.0.0.1") -> list[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [socket.create_connection((host, port)) if family == socket.AF_INET else _connect6(host, port)
            for _ in range(count)]  # fmt: skip


def _connect6(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.connect((host, port))
    return sock


def queues(listener: Listener, sockets: list[socket.socket] | tuple[socket.socket, ...]) -> list[int]:
    """Connections waiting on each socket; the kernel queues a loopback connection before
    connect() returns, so no wait is needed."""
    return [listener.queued(sock) for sock in sockets]


def drain(sockets: list[socket.socket] | tuple[socket.socket, ...]) -> None:
    for sock in sockets:
        while True:
            try:
                sock.accept()[0].close()
            except BlockingIOError:
                break


def close_all(clients: list[socket.socket]) -> None:
    for client in clients:
        client.close()


def test_tcp_listeners_are_steered_and_every_connection_goes_where_it_is_steered(tcp: Listener) -> None:
    assert tcp.steered and tcp.path in ("reuseport", "reuseport+migrate")
    first = tcp.sock
    second = tcp.instance_socket()
    assert tcp.members == (first, second) and tcp.sock is first
    port = port_of(tcp)
    assert second.getsockname() == first.getsockname()

    clients = connect(port, 6)
    assert queues(tcp, [first, second]) == [6, 0]  # a new member gets nothing until steered to
    drain([first])
    tcp.steer_to(second)
    clients += connect(port, 6)
    assert queues(tcp, [first, second]) == [0, 6] and tcp.sock is second
    tcp.steer_to(first)
    clients += connect(port, 3)
    assert queues(tcp, [first, second]) == [3, 6]
    close_all(clients)


def test_a_probe_route_reaches_its_socket_while_everyone_else_goes_to_the_target(tcp: Listener) -> None:
    first, second = tcp.sock, tcp.instance_socket()
    port = port_of(tcp)
    with tcp.probe_route(second) as (probe, destination):
        assert destination == ("127.0.0.1", port)
        probe.setblocking(True)
        probe.connect(destination)
        public = connect(port, 4)
        assert queues(tcp, [first, second]) == [4, 1]
    assert probe.fileno() == -1  # the route ends with the block
    close_all(public)


def test_ipv6_and_ipv4_mapped_connections_are_steered_and_routed_too() -> None:
    try:
        (listener,) = bind_listeners((SocketSpec("tcp", "::", 0, "web"),))
    except ListenerError as e:
        pytest.fail(f"no IPv6 on this machine's loopback: {e}")
    try:
        first, second = listener.sock, listener.instance_socket()
        port = port_of(listener)
        listener.steer_to(second)
        clients = connect(port, 2, host="::1") + connect(port, 2, host="127.0.0.1")  # dual-stack
        assert queues(listener, [first, second]) == [0, 4]
        with listener.probe_route(first) as (probe, destination):
            assert destination[:2] == ("::1", port)
            probe.setblocking(True)
            probe.connect(destination)
            assert queues(listener, [first, second]) == [1, 4]
        close_all(clients)
    finally:
        listener.close()


def test_releasing_a_socket_keeps_the_kernels_numbering(tcp: Listener) -> None:
    """The kernel moves a group's last socket into the place of one that leaves: steering to
    each remaining socket must still reach exactly that socket."""
    a, b, c = tcp.sock, tcp.instance_socket(), tcp.instance_socket()
    port = port_of(tcp)
    tcp.steer_to(b)
    tcp.release(a)
    assert a.fileno() == -1 and tcp.members == (c, b)
    clients = []
    for target, other in ((b, c), (c, b), (b, c)):
        tcp.steer_to(target)
        clients += connect(port, 3)
        assert (tcp.queued(target), tcp.queued(other)) == (3, 0)
        drain([target])
    tcp.release(tcp.sock)  # the target is never released
    assert tcp.members == (c, b)
    close_all(clients)


def test_a_socket_an_app_shut_down_is_forgotten(tcp: Listener, caplog: pytest.LogCaptureFixture) -> None:
    a, b, c = tcp.sock, tcp.instance_socket(), tcp.instance_socket()
    port = port_of(tcp)
    a.shutdown(socket.SHUT_RD)  # what an app must never do to its copy: the socket leaves the group
    tcp.steer_to(c)
    assert tcp.members == (c, b)
    assert any("stopped listening" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    clients = connect(port, 2)
    assert queues(tcp, [b, c]) == [0, 2]
    close_all(clients)


def test_an_address_in_use_is_refused_even_by_a_reuseport_listener_of_the_same_user() -> None:
    for reuseport in (False, True):
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
            other.bind(("127.0.0.1", 0))
            other.listen(8)
            port = other.getsockname()[1]
            with pytest.raises(ListenerError, match=rf"cannot listen on tcp:127.0.0.1:{port}: Address already in use"):
                bind_listeners((SocketSpec("tcp", "127.0.0.1", port, "web"),))


def test_unix_sockets_and_steer_false_share_one_socket(tmp_path: Path) -> None:
    specs = (SocketSpec("unix", str(tmp_path / "app.sock"), 0, "admin"), SocketSpec("tcp", "127.0.0.1", 0, "web"))
    for steer in (True, False):
        made = bind_listeners(specs, steer=steer)
        try:
            unix, web = made
            assert unix.path == "shared" and (web.path == "shared") is (not steer)
            shared = unix.sock
            assert unix.instance_socket() is shared and unix.members == (shared,)
            if not steer:
                assert web.instance_socket() is web.sock and web.members == (web.sock,)
                with pytest.raises(ListenerError, match="need the reuseport path"):
                    with web.probe_route(web.sock):
                        pass
        finally:
            listeners.close_listeners(made)


def test_a_kernel_refusing_the_program_gets_a_shared_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from sshfwup.supervisor import reuseport

    monkeypatch.setattr(reuseport, "_SO_ATTACH_REUSEPORT_CBPF", 0x7FFF)  # an option no kernel knows
    (listener,) = bind_listeners((SocketSpec("tcp", "127.0.0.1", 0, "web"),))
    try:
        assert listener.path == "shared" and not listener.steered
        sock = listener.sock
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)  # nobody can join it
        clients = connect(port_of(listener), 2)
        assert listener.queued(sock) == 2
        close_all(clients)
    finally:
        listener.close()


# --- migration, in a network namespace of its own ----------------------------------------------

_MIGRATION_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    from sshfwup.config import SocketSpec
    from sshfwup.supervisor.listeners import bind_listeners

    (listener,) = bind_listeners((SocketSpec("tcp", "127.0.0.1", 0, "web"),))
    old, new = listener.sock, listener.instance_socket()
    port = old.getsockname()[1]
    clients = []
    for i in range(3):
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"request %d" % i)
        clients.append(client)
    listener.steer_to(new)
    listener.release(old)  # three connections still queued on it
    received = []
    while True:
        try:
            conn, _ = new.accept()
        except BlockingIOError:
            break
        conn.setblocking(True)
        received.append(conn.recv(100).decode())
    reset = 0
    for client in clients:
        client.settimeout(1)
        try:
            client.sendall(b"more")
            client.recv(1)
        except ConnectionResetError:
            reset += 1
        except socket.timeout:
            pass
    print(json.dumps({"path": listener.path, "received": received, "reset": reset}))
    """
)


@pytest.mark.parametrize("migrate", [1, 0])
def test_connections_queued_on_a_released_socket_move_when_the_kernel_migrates(migrate: int) -> None:
    shell = f"ip link set lo up && sysctl -qw net.ipv4.tcp_migrate_req={migrate} && exec \"$0\" -c \"$1\""
    done = subprocess.run(["unshare", "--net", "sh", "-c", shell, sys.executable, _MIGRATION_SCRIPT],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    if migrate:
        assert outcome == {"path": "reuseport+migrate", "received": ["request 0", "request 1", "request 2"], "reset": 0}
    else:
        assert outcome == {"path": "reuseport", "received": [], "reset": 3}


def test_the_socket_path_follows_the_kernel_setting() -> None:
    with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
        enabled = f.read().strip() == "1"
    (listener,) = bind_listeners((SocketSpec("tcp", "127.0.0.1", 0, "web"),))
    try:
        assert listener.path == ("reuseport+migrate" if enabled else "reuseport")
    finally:
        listener.close()


def test_readiness_probe_http_goes_through_a_route(tcp: Listener) -> None:
    """http_probe with a route talks to the routed socket's server, not the target's."""
    import anyio

    first, second = tcp.sock, tcp.instance_socket()

    def answer(listener_sock: socket.socket, status: str) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                conn, _ = listener_sock.accept()
            except BlockingIOError:
                time.sleep(0.005)
                continue
            conn.setblocking(True)
            conn.recv(4096)
            conn.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
            conn.close()
            return

    async def probe() -> str | None:
        with tcp.probe_route(second) as route:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(anyio.to_thread.run_sync, answer, second, "204 No Content")
                result = await listeners.http_probe(0, "/health", route=route)
        return result

    assert anyio.run(probe) is None
    assert tcp.queued(first) == 0


def test_an_accept_probe_ends_when_its_own_connection_is_accepted_not_before(tcp: Listener) -> None:
    """The queue is first in, first out: with three connections ahead of the probe's, three
    accepts are not enough."""
    import anyio

    target = tcp.sock
    ahead = connect(port_of(tcp), 3)
    accepted: list[socket.socket] = []

    async def scenario() -> None:
        done = anyio.Event()
        with tcp.probe_connection(target) as route:

            async def probe() -> None:
                await listeners.accept_probe(target, route)
                done.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(probe)
                await anyio.sleep(0.1)
                assert not done.is_set() and tcp.queued(target) == 4
                accepted.extend(target.accept()[0] for _ in range(3))
                await anyio.sleep(0.1)
                assert not done.is_set()  # its own connection is still queued
                accepted.append(target.accept()[0])
                with anyio.fail_after(1):
                    await done.wait()

    try:
        anyio.run(scenario)
    finally:
        close_all(ahead + accepted)


def test_a_probe_accepted_while_the_queue_length_stays_put_is_seen_accepted(tcp: Listener) -> None:
    """Issue #20: under a closed-loop load a new connection arrives for each one accepted, so the
    queue's length hides every departure. The kernel's lookup of the probe's own connection does
    not: here four are accepted (the probe's among them) and four others arrive between two polls."""
    import anyio

    target = tcp.sock
    ahead = connect(port_of(tcp), 3)
    accepted: list[socket.socket] = []
    arrived: list[socket.socket] = []

    async def scenario() -> None:
        done = anyio.Event()
        with tcp.probe_connection(target) as route:

            async def probe() -> None:
                await listeners.accept_probe(target, route, stall_timeout=60)
                done.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(probe)
                await anyio.sleep(0.1)
                assert not done.is_set() and tcp.queued(target) == 4
                # no await in between: the probe's poll cannot see the queue any shorter
                accepted.extend(target.accept()[0] for _ in range(4))
                arrived.extend(connect(port_of(tcp), 4))
                assert tcp.queued(target) == 4
                with anyio.fail_after(10):
                    await done.wait()

    try:
        anyio.run(scenario)
    finally:
        close_all(ahead + accepted + arrived)


def test_a_probe_on_a_wildcard_listener_is_accepted_when_its_connection_is() -> None:
    """The server's end of a connection to 0.0.0.0 is bound to the address connected to."""
    import anyio

    (web,) = bind_listeners((SocketSpec("tcp", "0.0.0.0", 0, "web"),))
    accepted: list[socket.socket] = []

    async def scenario() -> None:
        done = anyio.Event()
        with web.probe_connection(web.sock) as route:

            async def probe() -> None:
                await listeners.accept_probe(web.sock, route, stall_timeout=60)
                done.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(probe)
                await anyio.sleep(0.2)
                assert not done.is_set() and web.queued(web.sock) == 1
                accepted.append(web.sock.accept()[0])
                with anyio.fail_after(10):
                    await done.wait()

    try:
        anyio.run(scenario)
    finally:
        close_all(accepted)
        web.close()


def test_a_probe_waiting_on_a_queue_that_does_not_move_stalls(tcp: Listener) -> None:
    """Nothing accepted at all for stall_timeout while the probe waits: no progress, not busy."""
    import anyio

    target = tcp.sock
    ahead = connect(port_of(tcp), 2)

    async def scenario() -> listeners.AcceptStalled:
        with tcp.probe_connection(target) as route, pytest.raises(listeners.AcceptStalled) as stalled:
            with anyio.fail_after(10):
                await listeners.accept_probe(target, route, stall_timeout=0.3)
        return stalled.value

    try:
        stalled = anyio.run(scenario)
    finally:
        close_all(ahead)
    assert stalled.queued == 3 and stalled.seconds >= 0.3
    assert str(stalled).startswith("a probe connection waited ")


def test_a_queue_that_keeps_moving_is_not_a_stall(tcp: Listener) -> None:
    """A probe far back in a queue that drains slowly (one accept per poll or so, each within the
    stall time) is accepted in the end, however long that takes in all."""
    import anyio

    target = tcp.sock
    ahead = connect(port_of(tcp), 6)
    accepted: list[socket.socket] = []

    async def scenario() -> None:
        with tcp.probe_connection(target) as route:
            async with anyio.create_task_group() as tasks:

                async def accept_slowly() -> None:
                    while True:
                        await anyio.sleep(0.15)  # less than the stall time, more than it takes in all
                        try:
                            accepted.append(target.accept()[0])
                        except BlockingIOError:
                            pass

                tasks.start_soon(accept_slowly)
                with anyio.fail_after(20):
                    await listeners.accept_probe(target, route, stall_timeout=0.4)
                tasks.cancel_scope.cancel()

    try:
        anyio.run(scenario)
    finally:
        close_all(ahead + accepted)
    assert len(accepted) >= 7  # the six ahead, then the probe's own


def test_without_socket_diagnostics_a_probe_counts_departures_from_the_queue(
    tcp: Listener, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel without inet_diag: said once, and the queue's length decides (exact when idle)."""
    import anyio

    from sshfwup.supervisor import probes, sockdiag

    def unavailable() -> sockdiag.SockDiag:
        raise sockdiag.SockDiagUnavailable(93, "no socket diagnostics (NETLINK_SOCK_DIAG): Protocol not supported")

    monkeypatch.setattr(probes, "_sockdiag_state", [])
    monkeypatch.setattr(sockdiag, "SockDiag", unavailable)
    target = tcp.sock
    ahead = connect(port_of(tcp), 2)
    accepted: list[socket.socket] = []

    async def scenario() -> None:
        done = anyio.Event()
        with tcp.probe_connection(target) as route:

            async def probe() -> None:
                await listeners.accept_probe(target, route, stall_timeout=60)
                done.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(probe)
                await anyio.sleep(0.1)
                accepted.extend(target.accept()[0] for _ in range(2))
                await anyio.sleep(0.1)
                assert not done.is_set()  # its own connection is still queued
                accepted.append(target.accept()[0])
                with anyio.fail_after(5):
                    await done.wait()

    with caplog.at_level(logging.WARNING, logger="sshfwup.supervisor.listeners"):
        try:
            anyio.run(scenario)
        finally:
            close_all(ahead + accepted)
    assert probes._sockdiag_state == [False]
    assert [r.message for r in caplog.records if "count accepts from the accept queue" in r.message] != []


def test_socket_diagnostics_tell_a_queued_connection_from_an_accepted_one(tcp: Listener) -> None:
    from sshfwup.supervisor import sockdiag

    (client,) = connect(port_of(tcp))
    with sockdiag.SockDiag() as diag:
        diag.check(tcp.sock)
        local, remote = tcp.sock.getsockname(), client.getsockname()
        assert diag.server_end(local, remote).queued
        accepted, _ = tcp.sock.accept()
        end = diag.server_end(local, remote)
        assert end.found and not end.queued and end.inode > 0
        accepted.close()
        assert not diag.server_end(local, remote).queued  # closed by the app that accepted it
        assert not diag.server_end(local, ("127.0.0.1", 1)).found
    client.close()


def test_probe_connections_on_the_shared_path_and_none_on_unix_sockets(tmp_path: Path) -> None:
    import anyio

    unix, web = bind_listeners(
        (SocketSpec("unix", str(tmp_path / "app.sock"), 0, "admin"), SocketSpec("tcp", "127.0.0.1", 0, "web")),
        steer=False,
    )
    try:
        with pytest.raises(ListenerError, match=r"admin: unix:.* has no accept queue a probe can watch"):
            with unix.probe_connection(unix.sock):
                pass

        async def probe() -> None:
            with anyio.fail_after(5), web.probe_connection(web.sock) as route:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(listeners.accept_probe, web.sock, route)
                    await anyio.sleep(0.1)
                    assert web.queued(web.sock) == 1  # the probe connection, on the one shared socket
                    web.sock.accept()[0].close()

        anyio.run(probe)
    finally:
        listeners.close_listeners((unix, web))


def test_accepted_connections_have_nagle_off_whatever_the_server_does(tcp: Listener) -> None:
    for sock in (tcp.sock, tcp.instance_socket()):
        tcp.steer_to(sock)
        (client,) = connect(port_of(tcp))
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
