"""Logins under pre-authentication floods: sshfwup vs OpenSSH's sshd, same limits, same run (issue #9).

Both servers get the same limits: sshd ``MaxStartups 10:30:60``, ``PerSourceMaxStartups 3``,
``LoginGraceTime 20`` (sshd 9.2 has no ``PerSourcePenalties``; 9.8 does); sshfwup its defaults (``max_startups = "10:30:60"``,
``max_startups_per_source = 3``, ``login_timeout = 20``; since issue 27 connections over those
limits wait in a queue, ``startup_queue_per_source = 32``, ``startup_queue = 64``). For each attack, held open or kept up
while it runs, the real OpenSSH client logs in N times with a valid key (``ssh HOST true`` on sshd,
``ssh HOST status`` on sshfwup); the figure is how many logins succeed, and how many of the
attacker's connections the server kept. Attack traffic comes from other loopback addresses
(127.0.0.2 …, 127.0.1.x) than the logins (127.0.0.1) — except in the shared-address cases
(issue 27): the logins come from the flooding address itself (an office behind one NAT), and
a burst of ``BURST`` logins is started at once from one address (a fleet tool with forks).

    .venv/bin/python bench/preauth_flood.py [--quick] [--logins N]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

import common
from common import Sshd

LIMITS = "MaxStartups 10:30:60\nPerSourceMaxStartups 3\nLoginGraceTime 20\n"
VERSION = b"SSH-2.0-flood\r\n"


@dataclass
class Flood:
    """Attack connections to one port, held open (or renewed) until stopped."""

    port: int
    sockets: list[socket.socket]
    stop: threading.Event
    thread: threading.Thread | None = None

    def kept(self) -> int:
        """How many the server still holds: it sent us its version line and has not closed."""
        alive = 0
        for s in list(self.sockets):
            try:
                s.settimeout(0.05)
                data = s.recv(64, socket.MSG_PEEK)
                alive += data.startswith(b"SSH-")
            except OSError:
                continue
        return alive


def _connect(port: int, source: str, hello: bytes | None) -> socket.socket | None:
    s = socket.socket()
    try:
        s.bind((source, 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        if hello:
            s.sendall(hello)
        return s
    except OSError:
        s.close()
        return None


SHARED = "127.0.0.2"  # the flooding address that the "own address" logins come from too
BURST = 30


def _sources(kind: str, count: int) -> list[str]:
    if kind in ("one", "own"):
        return [SHARED] * count
    return [f"127.0.1.{i + 1}" for i in range(count)]


@contextmanager
def flood(port: int, attack: str) -> Iterator[Flood]:
    """One attack (see ATTACKS), running for the duration of the block."""
    kind, what, count = ATTACKS[attack]
    hello = VERSION + b"\x00\x00" if what == "slow" else None  # version line, then half a packet
    stop = threading.Event()
    f = Flood(port, [], stop)
    if what == "churn":  # silent connections renewed every 0.5 s: none ever looks old
        def renew() -> None:
            while not stop.is_set():
                fresh = [s for s in (_connect(port, src, None) for src in _sources(kind, count)) if s]
                old, f.sockets[:] = list(f.sockets), fresh
                for s in old:
                    s.close()
                stop.wait(0.5)

        f.thread = threading.Thread(target=renew, daemon=True)
        f.thread.start()
    else:
        f.sockets.extend(s for s in (_connect(port, src, hello) for src in _sources(kind, count)) if s)
    try:
        # the attack settles: held connections age past sshfwup's silent grace (1 s), or, for
        # handshakes held open, past its stall grace (5 s) — as most of a held flood would be;
        # a renewing flood runs for 12 s first (an attack lasts; penalties need it to add up)
        time.sleep({"slow": 6.0, "churn": 12.0}.get(what, 1.5))
        yield f
    finally:
        stop.set()
        if f.thread is not None:
            f.thread.join(10)
        for s in f.sockets:
            s.close()


#: name → (sources, behaviour, connections)
ATTACKS: dict[str, tuple[str, str, int]] = {
    "none": ("one", "silent", 0),
    "50 silent, one address": ("one", "silent", 50),
    "20 slow handshakes, one address": ("one", "slow", 20),
    "50 silent, 50 addresses": ("many", "silent", 50),
    "50 slow handshakes, 50 addresses": ("many", "slow", 50),
    "50 silent renewed every 0.5 s, 50 addresses": ("many", "churn", 50),
    "50 silent, the logins' own address": ("own", "silent", 50),
    f"burst: {BURST} logins at once, one address": ("one", "silent", 0),
}


def login_argv(port: int, key: common.KeyPair, command: str) -> list[str]:
    return ["ssh", *common.SSH_OPTIONS, "-i", str(key.private), "-p", str(port), "root@127.0.0.1", command]


def for_attack(argv: list[str], attack: str) -> list[str]:
    """The logins of ``attack``: from the flooding address itself in the shared-address case."""
    return [argv[0], "-b", SHARED, *argv[1:]] if ATTACKS[attack][0] == "own" else argv


def login(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def logins(argv: list[str], n: int) -> int:
    return sum(login(argv) for _ in range(n))


def burst(argv: list[str], n: int) -> int:
    """``n`` logins started at once; how many succeed."""
    with ThreadPoolExecutor(n) as pool:
        return sum(pool.map(lambda _: login(argv), range(n)))


async def main(args: argparse.Namespace) -> int:
    n = args.logins or (5 if args.quick else 20)
    rows = []
    with common.workdir("preauth") as work:
        key = common.make_key(work / "uploader")
        firmware = common.sample_firmware(work, "1.0.0")
        with Sshd(work, key, extra_config=LIMITS) as sshd:
            async with common.sim_device(work, key, firmware) as sim:
                servers: dict[str, tuple[int, list[str]]] = {
                    "sshd": (sshd.port, login_argv(sshd.port, key, "true")),
                    "sshfwup": (sim.ssh_port, login_argv(sim.ssh_port, key, "status")),
                }
                print(f"{n} logins per attack and server; {sys.platform}, load average {common.os.getloadavg()[0]:.2f}")
                for attack in ATTACKS:
                    row: dict[str, object] = {"attack": attack}
                    for server, (port, argv) in servers.items():
                        with flood(port, attack) as f:
                            if attack.startswith("burst"):
                                ok = await anyio.to_thread.run_sync(burst, argv, BURST)
                            else:
                                ok = await anyio.to_thread.run_sync(logins, for_attack(argv, attack), n)
                            kept = f.kept()
                        row[server] = ok
                        row[f"{server} kept"] = kept
                        of = BURST if attack.startswith("burst") else n
                        print(f"  {attack:<46} {server:<8} {ok:>3}/{of} logins, attacker connections kept: {kept}",
                              flush=True)  # fmt: skip
                    rows.append(row)
    print()
    print(f"{'attack':<46} {'sshd':>9} {'sshfwup':>9}  kept by sshd / sshfwup")
    for r in rows:
        of = BURST if str(r["attack"]).startswith("burst") else n
        print(f"{r['attack']:<46} {r['sshd']:>5}/{of:<3} {r['sshfwup']:>5}/{of:<3}  {r['sshd kept']} / {r['sshfwup kept']}")
    held = [r for r in rows if r["sshfwup"] == n]
    common.save_results("preauth_flood", {"logins": n, "rows": rows})
    common.target(
        "every login succeeds under the held floods (one address, and 50 silent from 50 addresses)",
        all(r["sshfwup"] == n for r in rows
            if not any(word in str(r["attack"]) for word in ("renewed", "50 slow", "burst"))),
        f"{len(held)} of {len(rows)} attacks held for all {n} logins",
    )
    shared = [r for r in rows if "own address" in str(r["attack"]) or str(r["attack"]).startswith("burst")]
    common.target(
        f"a user sharing the flooding address gets in; a burst of {BURST} from one address is answered (issue 27)",
        all(r["sshfwup"] == (BURST if str(r["attack"]).startswith("burst") else n) for r in shared),
        ", ".join(f"{r['attack']}: {r['sshfwup']}" for r in shared),
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--logins", type=int, default=0)
    sys.exit(anyio.run(main, parser.parse_args()))
