"""The generated matrix (issue 24): every upload transport × every fault of the network or the
client × every concurrent operation a second client may try meanwhile.

    {ssh -s fwup, scp, scp -O, sftp, sshfwup upload}
  × {stall at the start, stall mid-file, stall in the last 256 KiB, TCP drop, client killed, slow tail}
  × {nothing, reboot, revert, validate, a second upload, status}

The clients are the real ones; the faults are made on the path by tests/update/fault_proxy.py.
Each cell checks:

- **the lock**: held by "an upload from ..." when the fault begins; released within
  ``[server] idle_timeout`` + 1.5 s of the last byte (a stall, a drop) or 1.5 s of the client's
  death, and not before the bound (an upload is not cut early);
- **the second client**: a state change (reboot, revert, validate, an upload) is refused naming
  the upload that holds the lock, and changes nothing; ``status`` answers, showing the upload;
- **the uploader**: a non-zero exit status, and the bound's words (the same on every transport)
  wherever the device's answer can still reach it; ``slow tail`` succeeds (exit 0);
- **the device**: boot env as before (only the slot fwup wrote may be marked incomplete, never
  after a stall at the start), the same boot, the same app (version, pid), slot a's bytes.

The default suite runs a sample (each transport meets each fault once, the concurrent
operations rotating: 30 cells); ``--run-slow`` runs all 180.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import SSH_OPTIONS, Sim, output, wait_until
from fault_proxy import FaultProxy, Trigger

from sshfwup.boot.bootenv import INCOMPLETE
from sshfwup.update.lock import DeviceLock

TRANSPORTS = ("ssh -s fwup", "scp", "scp -O", "sftp", "sshfwup upload")
FAULTS = ("stall at the start", "stall mid-file", "stall in the last 256 KiB", "TCP drop", "client killed", "slow tail")
OPERATIONS = ("nothing", "reboot", "revert", "validate", "a second upload", "status")
IDLE = 3.0  # [server] idle_timeout here: long enough for the second client's command
MARGIN = 1.5  # seconds: the lock is released this soon after the bound (or the client's death)
BOUND_WORDS = f"no data for {IDLE:.0f} s ([server] idle_timeout); upload aborted"
# the slow tail: 64 KiB every 0.25 s. The idle bound counts whole requests, and OpenSSH's SFTP
# clients write 255 KiB per request to a server that states its limits (asyncssh does): one
# complete every second, inside the 3 s bound.
SLOW = (64 * 1024, 0.25)
STALLS = ("stall at the start", "stall mid-file", "stall in the last 256 KiB")


@pytest.fixture
def sim_config() -> dict[str, Any]:
    # report_only: a successful upload switches the boot env and nothing else (no swap, no
    # reboot), so that one device serves a transport's whole row
    return {"fwup": {"success_callback": "sshfwup.update.update:report_only"}, "server": {"idle_timeout": IDLE}}


def cells(transport: str, *, whole: bool) -> list[tuple[str, str]]:
    i = TRANSPORTS.index(transport)
    if whole:
        chosen = [(fault, op) for fault in FAULTS for op in OPERATIONS]
    else:
        chosen = [(fault, OPERATIONS[(i + j) % len(OPERATIONS)]) for j, fault in enumerate(FAULTS)]
    return chosen


@dataclass(frozen=True)
class Snapshot:
    env: dict[str, str]
    boots: int
    app: tuple[Any, Any]
    slot_a: str


def snapshot(sim: Sim) -> Snapshot:
    st = sim.machine.state()
    assert st is not None
    app = sim.status()["app"] or {}
    return Snapshot(sim.env(), st.boot_count, (app.get("version"), app.get("pid")), sim.device.slot_bytes_sha256("a", 1 << 20))


def trigger_for(fault: str, size: int) -> int:
    """Client → server bytes after which the fault begins (the firmware's bytes dominate the
    count; the handshake adds a few KiB, SSH's framing ~0.3 %)."""
    return {"stall at the start": 0, "stall in the last 256 KiB": size - 96 * 1024,
            "slow tail": size - 224 * 1024}.get(fault, size // 2)  # fmt: skip


def client_argv(transport: str, sim: Sim, port: int, fw: Path) -> tuple[list[str], bytes | None]:
    opts = [*SSH_OPTIONS, "-i", str(sim.key.private)]
    target = f"{sim.user}@127.0.0.1"
    if transport == "ssh -s fwup":
        return ["ssh", *opts, "-p", str(port), "-s", target, "fwup"], None
    if transport in ("scp", "scp -O"):
        return ["scp", *transport.split()[1:], *opts, "-P", str(port), str(fw), f"{target}:/fwup"], None
    if transport == "sftp":
        return ["sftp", *opts, "-P", str(port), "-b", "-", target], f"put {fw} /fwup\n".encode()
    return [sys.executable, "-m", "sshfwup", "upload", target, str(fw), "-p", str(port), "-i", str(sim.key.private),
            "--insecure-accept-host-key"], None  # fmt: skip


def start_client(transport: str, sim: Sim, port: int, fw: Path) -> subprocess.Popen[bytes]:
    """The real client, uploading ``fw`` to the device through ``port`` (the proxy)."""
    argv, batch = client_argv(transport, sim, port, fw)
    with fw.open("rb") as data:  # the client has its own copy of the descriptor
        client = subprocess.Popen(argv, stdin=subprocess.PIPE if batch is not None else data,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    if batch is not None:
        assert client.stdin is not None
        client.stdin.write(batch)
        client.stdin.close()
        client.stdin = None  # communicate() must not flush it
    return client


@contextmanager
def upload_through_proxy(
    sim: Sim, lock: DeviceLock, fw: Path, transport: str, trigger: Trigger
) -> Iterator[tuple[FaultProxy, subprocess.Popen[bytes]]]:
    """A real client uploading ``fw`` through a fault proxy; both gone when the block ends."""
    proxy = FaultProxy(sim.port, lock.busy, trigger)
    client = start_client(transport, sim, proxy.port, fw)
    try:
        yield proxy, client
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        proxy.close()


async def client_output(client: subprocess.Popen[bytes]) -> str:
    return (await anyio.to_thread.run_sync(lambda: client.communicate(timeout=60)[0])).decode(errors="replace")


async def second_client(sim: Sim, op: str, fw: Path) -> subprocess.CompletedProcess[bytes] | None:
    if op == "nothing":
        return None
    if op == "a second upload":
        return await anyio.to_thread.run_sync(lambda: sim.upload(fw))
    argv = {"status": ["status", "--json"]}.get(op, [op])
    return await anyio.to_thread.run_sync(lambda: sim.ssh(*argv))


def check_second_client(op: str, result: subprocess.CompletedProcess[bytes] | None) -> None:
    if result is None:
        return
    text = output(result)
    if op == "status":
        assert result.returncode == 0, text
        assert json.loads(result.stdout)["update_in_progress"] is True, text
    else:
        assert result.returncode == 1, f"{op} went past the upload holding the lock: {text}"
        assert "busy: an upload from " in text, f"{op}: {text}"


async def wait_free(lock: DeviceLock, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while lock.busy():
        assert time.monotonic() < deadline, f"the update lock is still held {timeout:.0f} s on: {lock.holder()}"
        await anyio.sleep(0.02)
    return time.monotonic()


async def run_cell(sim: Sim, fw: Path, transport: str, fault: str, op: str) -> None:
    before = snapshot(sim)
    lock = DeviceLock(sim.device.run_dir / "update.lock")
    size = fw.stat().st_size
    with upload_through_proxy(sim, lock, fw, transport, Trigger(trigger_for(fault, size))) as (proxy, client):
        await wait_until(proxy.paused.is_set, timeout=60, what=f"{transport}: the upload reaching the fault's point")
        if fault != "stall at the start":  # where it stopped: past the start, short of the end
            assert size // 3 < proxy.up < size, (fault, proxy.up, size)
        holder = lock.holder()
        assert holder is not None and holder.who.startswith("an upload from "), holder
        check_second_client(op, await second_client(sim, op, fw))
        ended = proxy.paused_at
        if fault == "TCP drop":
            proxy.blackhole()
        elif fault == "client killed":
            client.kill()
            proxy.cut()  # what it had sent past the fault's point dies with it (on its host)
            ended = time.monotonic()
        elif fault == "slow tail":
            proxy.resume(slow=SLOW)
        if fault != "slow tail":
            bound = 0.0 if fault == "client killed" else IDLE
            freed = await wait_free(lock, bound + 10) - ended
            assert freed <= bound + MARGIN, f"the lock was released {freed:.1f} s after the fault (bound {bound:.0f} s)"
            assert freed >= bound - 0.5, f"the upload was cut {freed:.1f} s after the fault, before the bound"
            if fault in STALLS:
                proxy.resume()  # the client comes back: it hears how its upload ended
            elif fault == "TCP drop":
                proxy.cut()
        text = await client_output(client)
    await check_device(sim, transport, fault, before, client.returncode, text)


async def check_device(sim: Sim, transport: str, fault: str, before: Snapshot, code: int, text: str) -> None:
    after = snapshot(sim)
    assert after.boots == before.boots, "the device rebooted"
    assert after.app == before.app, "the app changed"
    assert after.slot_a == before.slot_a, "slot a changed"
    assert not sim.status()["update_in_progress"]
    target = "b"
    if fault == "slow tail":
        assert code == 0, f"{transport}: the slow tail failed: {text}"
        assert after.env["nerves_fw_active"] == target and after.env[f"{target}.nerves_fw_version"] == "2.0.0"
        restore_env(sim, before.env)  # the next cell starts from the same device (report_only: nothing else moved)
        return
    assert code != 0, f"{transport}: {fault}: the uploader exited 0: {text}"
    if fault in STALLS:
        assert BOUND_WORDS in text, f"{transport}: {fault}: the uploader was not told why: {text}"
    changed = {k for k in before.env.keys() | after.env.keys() if before.env.get(k) != after.env.get(k)}
    allowed = set() if fault == "stall at the start" else {f"{target}.sshfwup_state"}
    assert changed <= allowed, f"{fault}: the boot env changed: {sorted(changed)}"
    for key in changed:
        assert after.env[key] == INCOMPLETE, (key, after.env[key])


def restore_env(sim: Sim, env: dict[str, str]) -> None:
    now = sim.env()
    sim.device.set_env(**{k: env.get(k) for k in now.keys() | env.keys() if now.get(k) != env.get(k)})
    assert sim.env() == env


def big_firmware(firmware: Any) -> Path:
    """A firmware large enough for a middle and a last 256 KiB well apart from its start (the
    filler is a system file: a reboot verdict, which report_only never acts on)."""
    fw = firmware("2.0.0", filler=1200 * 1024)
    assert fw.stat().st_size > 1024 * 1024
    return fw


async def run_row(sim: Sim, firmware: Any, transport: str, *, whole: bool) -> None:
    fw = big_firmware(firmware)
    failures: list[str] = []
    for fault, op in cells(transport, whole=whole):
        started = time.monotonic()
        try:
            await run_cell(sim, fw, transport, fault, op)
        except AssertionError as e:
            failures.append(f"{transport} × {fault} × {op}: {e}")  # the row goes on: every failing cell is named
        print(f"{transport} × {fault} × {op}: {time.monotonic() - started:.1f} s")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_upload_matrix_sample(sim: Sim, firmware: Any, transport: str) -> None:
    await run_row(sim, firmware, transport, whole=False)


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_upload_matrix_whole(sim: Sim, firmware: Any, transport: str) -> None:
    await run_row(sim, firmware, transport, whole=True)


TOTAL = 4.0  # [server] upload_timeout for the trickle


async def trickle(sim: Sim, fw: Path, transport: str) -> None:
    """A client that sends steadily (SLOW: a whole SFTP request a second, inside the idle bound)
    but would take longer than ``upload_timeout`` is ended by the total bound."""
    lock = DeviceLock(sim.device.run_dir / "update.lock")
    before = snapshot(sim)
    with upload_through_proxy(sim, lock, fw, transport, Trigger(0)) as (proxy, client):
        await wait_until(proxy.paused.is_set, timeout=60, what=f"{transport}: the upload holding the lock")
        proxy.resume(slow=SLOW)
        freed = await wait_free(lock, TOTAL + 10) - proxy.paused_at
        if not TOTAL - 0.5 <= freed <= TOTAL + MARGIN:
            client.kill()
            raise AssertionError(f"the lock was released {freed:.1f} s after the upload began: {client.communicate()[0]!r}")
        text = await client_output(client)
    assert client.returncode != 0, text
    assert f"the upload took longer than {TOTAL:.0f} s ([server] upload_timeout); upload aborted" in text, text
    after = snapshot(sim)
    assert (after.boots, after.app, after.slot_a) == (before.boots, before.app, before.slot_a)
    assert after.env["nerves_fw_active"] == before.env["nerves_fw_active"]


TRICKLE_CONFIG = {"fwup": {"success_callback": "sshfwup.update.update:report_only"},
                  "server": {"idle_timeout": IDLE, "upload_timeout": TOTAL}}  # fmt: skip


@pytest.mark.parametrize("sim_config", [TRICKLE_CONFIG])
@pytest.mark.parametrize("transport", [pytest.param(t, marks=() if t == "sftp" else pytest.mark.slow) for t in TRANSPORTS])
async def test_a_trickle_is_ended_by_the_total_bound(sim: Sim, firmware: Any, transport: str) -> None:
    await trickle(sim, big_firmware(firmware), transport)
