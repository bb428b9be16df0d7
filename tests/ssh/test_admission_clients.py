"""Issue 27 with the real OpenSSH client against the simulated device: start-up limits that stop
floods without locking out a user who shares the flooding address.

- a burst of 30 concurrent ``ssh HOST status`` from one address is answered (queued, not refused);
- a penalised address is told why and for how long, and a client that retries every second gets
  in when that time is up (a refused retry does not renew the penalty);
- an address in ``penalty_exempt`` is never penalised, and a user from it gets in under a flood.

The unit-level rules (fake clock): tests/ssh/test_admission.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest
from conftest import Sim, output

REPORT_ONLY = {"fwup": {"success_callback": "sshfwup.update.update:report_only"}}
TOLD = re.compile(r"Received disconnect from [^:]+:12: (.*); try again in (\d+) s")


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return REPORT_ONLY


def _status_from(sim: Sim, source: str) -> subprocess.CompletedProcess[bytes]:
    return sim.ssh("status", "--json", options=["-b", source], timeout=60)


def _burst(sim: Sim, source: str, count: int) -> list[subprocess.CompletedProcess[bytes]]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: _status_from(sim, source), range(count)))


def _leave_without_logging_in(sim: Sim, source: str, rounds: int) -> int:
    """Up to ``rounds`` × 3 connections from ``source`` that close without a word once admitted:
    each adds 1 s of penalty (sshd's ``noauth``); three at a time (the per-source limit). Stops
    when one is no longer admitted (the penalty took); returns how many were admitted."""
    admitted = 0
    for _ in range(rounds):
        held = []
        try:
            for _ in range(3):
                s = socket.socket()
                held.append(s)
                s.bind((source, 0))
                s.settimeout(10)
                s.connect(("127.0.0.1", sim.port))
            for s in held:  # admitted: the server's version line arrives; refused: closed
                if not s.recv(8).startswith(b"SSH-"):
                    return admitted
                admitted += 1
        except OSError:
            return admitted
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)  # the server sees them go before the next round arrives
    return admitted


def _retry_every_second(sim: Sim, source: str, limit: float) -> tuple[list[str], float]:
    """``ssh status`` from ``source`` once a second until it works; what it was told, and when it worked."""
    started, told = time.monotonic(), []
    while time.monotonic() - started < limit:
        result = _status_from(sim, source)
        if result.returncode == 0:
            return told, time.monotonic() - started
        told.append(output(result))
        time.sleep(1.0)
    raise AssertionError(f"no login from {source} in {limit:.0f} s; told: {told[-3:]}")


async def test_a_burst_of_30_status_calls_from_one_address_is_answered(sim: Sim) -> None:
    results = await anyio.to_thread.run_sync(_burst, sim, "127.0.0.1", 30)
    failed = [output(r) for r in results if r.returncode != 0]
    assert not failed, f"{len(failed)} of 30 failed, e.g. {failed[:2]}"
    assert all(json.loads(r.stdout)["active"] == "a" for r in results)  # each one answered in full
    log = sim.machine.log_path.read_text()
    assert "is penalised" not in log  # the server's own limit never penalised the address
    assert log.count("queued connections from 127.0.0.1") <= 3  # once per source per interval


async def test_a_penalty_is_told_and_runs_out_on_time_while_the_client_retries(sim: Sim) -> None:
    admitted = await anyio.to_thread.run_sync(_leave_without_logging_in, sim, "127.0.0.4", 8)
    assert admitted >= 10  # penalty_min: 10 s
    told, took = await anyio.to_thread.run_sync(_retry_every_second, sim, "127.0.0.4", 60.0)
    assert told, "the address was never refused: the penalty did not take"
    first = TOLD.search(told[0])
    assert first is not None, told[0]
    assert "your address is penalised" in first.group(1)
    stated = int(first.group(2))
    assert took <= stated + 10, (stated, took, len(told))  # not renewed by the retries (slack: ssh start-up)
    log = sim.machine.log_path.read_text()
    assert log.count("refused connections from 127.0.0.4") <= 1 + int(took // 10) + 1  # not one per retry


async def test_an_exempt_address_is_never_penalised_and_gets_in_under_its_own_flood(sim: Sim) -> None:
    await sim.restart_server(server={"penalty_exempt": ["127.0.0.5/32", "2001:db8::/48"]})
    assert await anyio.to_thread.run_sync(_leave_without_logging_in, sim, "127.0.0.5", 6) == 18  # never refused
    flood = []
    try:
        for _ in range(20):  # silent connections held open from the same address
            s = socket.socket()
            s.bind(("127.0.0.5", 0))
            s.connect(("127.0.0.1", sim.port))
            flood.append(s)
        await anyio.sleep(1.5)  # silent past the grace
        result = await anyio.to_thread.run_sync(_status_from, sim, "127.0.0.5")
    finally:
        for s in flood:
            s.close()
    assert result.returncode == 0, output(result)
    assert "127.0.0.5 is penalised" not in sim.machine.log_path.read_text()


@pytest.mark.slow
async def test_bursts_of_100_from_one_address_are_answered(sim: Sim) -> None:
    results = await anyio.to_thread.run_sync(_burst, sim, "127.0.0.1", 100)
    told = [TOLD.search(output(r)) for r in results if r.returncode != 0]
    assert all(t is not None for t in told), "a refusal without its reason"
    print(f"100 at once: {100 - len(told)} answered, {len(told)} refused with the reason")
