"""No cut upload ever commits, on any transport; fwup's verdict is the verdict (real fwup).

Real fwup commits as soon as it reads the archive's central directory, a few hundred bytes before
the end of a ``.fw``. These tests cut uploads at offsets right there (and elsewhere) — as a
genuine EOF of a truncated file and as a dropped connection — and check after every cut that the
boot env, the running slot and the app are untouched and the journal says what happened; then
that a complete upload still goes through. The default suite runs a fixed sample of offsets;
``--run-slow`` runs the whole sweep (every offset in the last 4 KiB over ``ssh -s``, 64 in the
last MiB, 20 spread over the file).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest
from conftest import B_MARKED, SSH_OPTIONS, Sim, assert_untouched, journal, output, wait_unlocked

from sshfwup.sim.host import zip_payload

MiB = 1 << 20


def assert_nothing_changed(sim: Sim, what: str) -> None:
    """Env, running slot and app as before; the journal records a failed update."""
    assert_untouched(sim)
    assert sim.machine.state().slot == "a", what  # type: ignore[union-attr]
    assert sim.app()["version"] == "1.0.0", what
    record = journal(sim)
    assert record["stage"] == "failed", (what, record)
    # "not changed" exactly when nothing was; a slot fwup may have written stays marked, and is named
    marked = sim.env().get("b.sshfwup_state") == "incomplete"
    said = "not changed" in record["verdict"] or "nothing was changed" in record["verdict"]
    assert said != marked, (what, record)


def spread(n: int, count: int, start: int = 0) -> list[int]:
    """``count`` offsets spread evenly over [start, n)."""
    return sorted({start + (n - start) * i // count for i in range(count)})


def sweep(n: int, slow: bool) -> list[int]:
    """Offsets to cut an ``n``-byte upload at: every one in the last 4 KiB, 64 in the last MiB and 20
    over the file with --run-slow; a fixed sample of the same regions otherwise."""
    if slow:
        last_4k = list(range(max(n - 4096, 0), n))
        last_mib = spread(n, 64, max(n - MiB, 0))
        overall = spread(n, 20)
    else:
        last_4k = [n - 1, n - 2, n - 21, n - 22, n - 23, n - 100, n - 180, n - 300, n - 1000, n - 4096]
        last_mib = spread(n, 6, max(n - MiB, 0))
        overall = spread(n, 5)
    return sorted({o for o in (*last_4k, *last_mib, *overall) if 0 <= o < n})


@contextmanager
def control_master(sim: Sim, tmp: Path) -> Iterator[list[str]]:
    """One SSH connection (OpenSSH ControlMaster) that many uploads reuse: each is a new session."""
    sock = tmp / "cm.sock"
    base = ["ssh", *SSH_OPTIONS, "-i", str(sim.key.private), "-p", str(sim.port), "-S", str(sock)]
    master = subprocess.Popen([*base, "-M", "-N", f"{sim.user}@{sim.host}"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run([*base, "-O", "check", "x"], capture_output=True).returncode != 0:
            assert master.poll() is None and time.monotonic() < deadline, "the control master did not come up"
            time.sleep(0.05)
        yield [*base, f"{sim.user}@{sim.host}"]
    finally:
        master.terminate()
        master.wait(timeout=10)


@pytest.fixture
def big_v2(firmware) -> bytes:
    """A 2.0.0 firmware of a little over 1 MiB, so that 'the last MiB' is not the whole file."""
    return firmware("2.0.0", filler=1200 * 1024).read_bytes()


async def test_truncated_ssh_uploads_never_commit(sim: Sim, big_v2: bytes, request: pytest.FixtureRequest,
                                                  tmp_path: Path) -> None:  # fmt: skip
    """``head -c OFFSET v2.fw | ssh -s dev fwup``: a genuine EOF of a cut file, at every offset
    where fwup would already have found the central directory, and around it."""
    slow = request.config.getoption("--run-slow")
    offsets = sweep(len(big_v2), slow)
    started = time.monotonic()
    with control_master(sim, tmp_path) as ssh:
        for offset in offsets:
            result = subprocess.run([*ssh[:-1], "-s", ssh[-1], "fwup"], input=big_v2[:offset],
                                    capture_output=True, timeout=60)  # fmt: skip
            text = output(result)
            assert result.returncode == 1, (offset, text)
            marked = sim.env().get("b.sshfwup_state") == "incomplete"  # fwup had bytes: may have written
            assert ("the device was not changed" in text) != marked, (offset, text)
            assert (B_MARKED in text) == marked, (offset, text)
            assert_nothing_changed(sim, f"cut at {offset}")
        print(f"\n{len(offsets)} truncated ssh -s uploads of {len(big_v2)} bytes refused "
              f"in {time.monotonic() - started:.1f} s")  # fmt: skip
        result = subprocess.run([*ssh[:-1], "-s", ssh[-1], "fwup"], input=big_v2, capture_output=True, timeout=120)
    assert result.returncode == 0, output(result)  # (the filler is a system file: a reboot verdict)
    assert "Success!" in output(result) and sim.env()["b.nerves_fw_version"] == "2.0.0"


@pytest.mark.parametrize("transport", ["scp", "scp -O", "sftp"])
async def test_truncated_uploads_never_commit_over_scp_and_sftp(
    sim: Sim, firmware, transport: str, tmp_path: Path
) -> None:
    v2 = firmware("2.0.0").read_bytes()
    n = len(v2)
    for offset in (n - 1, n - 22, n - 100, n - 4096, n // 2):
        cut = tmp_path / "v2.fw"
        cut.write_bytes(v2[:offset])
        if transport == "sftp":
            result = sim.sftp(f"put {cut} /fwup\n")
        else:
            result = sim.scp(cut, legacy=transport == "scp -O")
        assert result.returncode != 0, (transport, offset, output(result))
        await anyio.to_thread.run_sync(wait_unlocked, sim)
        assert_nothing_changed(sim, f"{transport} cut at {offset}")
    (tmp_path / "v2.fw").write_bytes(v2)
    good = sim.sftp(f"put {tmp_path / 'v2.fw'} /fwup\n") if transport == "sftp" else sim.scp(
        tmp_path / "v2.fw", legacy=transport == "scp -O")
    assert good.returncode == 0, output(good)


def _client(sim: Sim) -> Any:
    return asyncssh.connect(
        "127.0.0.1", sim.port, username="root", client_keys=[str(sim.key.private)], known_hosts=None
    )


async def _drop_after(sim: Sim, transport: str, data: bytes) -> None:
    """Send ``data`` the way ``transport`` would, then drop the TCP connection: no EOF, no close."""
    conn = await _client(sim)
    try:
        if transport == "ssh -s":
            proc = await conn.create_process(subsystem="fwup", encoding=None)
            proc.stdin.write(data)
            await proc.stdin.drain()
        elif transport == "scp -O":
            proc = await conn.create_process("scp -t /fwup", encoding=None)
            assert await proc.stdout.readexactly(1) == b"\0"
            proc.stdin.write(f"C0644 {len(data) + 1000} v2.fw\n".encode())
            assert await proc.stdout.readexactly(1) == b"\0"
            proc.stdin.write(data)
            await proc.stdin.drain()
        else:
            sftp = await conn.start_sftp_client()
            f = await sftp.open("/fwup", "wb")
            await f.write(data)  # waits for the server's acknowledgement of every block
        await anyio.sleep(0.3)
    finally:
        conn.abort()


@pytest.mark.parametrize("transport", ["ssh -s", "scp -O", "sftp"])
async def test_dropped_connections_never_commit(sim: Sim, firmware, transport: str) -> None:
    """The TCP connection dies mid-upload (asyncssh closes SFTP handles on a drop: not a close)."""
    v2 = firmware("2.0.0").read_bytes()
    n = len(v2)
    for offset in (n - 1, n - 22, n - 145, n - 4096):
        await _drop_after(sim, transport, v2[:offset])
        await anyio.to_thread.run_sync(wait_unlocked, sim)
        assert_nothing_changed(sim, f"{transport} dropped at {offset}")
    result = sim.upload(v2)
    assert result.returncode == 0, output(result)


async def test_killed_openssh_client_never_commits(sim: Sim, big_v2: bytes) -> None:
    """``ssh`` SIGKILLed with the whole file but its last bytes sent (no EOF reaches the server)."""
    n = len(big_v2)
    for offset in (n - 1, n - 200, n - 70_000, n - MiB):
        proc = subprocess.Popen(["ssh", *sim._opts(None, "-p"), "-s", "root@127.0.0.1", "fwup"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(big_v2[:offset])
        proc.stdin.flush()
        await anyio.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdin.close()
        await anyio.to_thread.run_sync(wait_unlocked, sim)
        assert_nothing_changed(sim, f"ssh killed after {offset}")


# --- fwup's verdict is the verdict: a good upload whose end arrives late -------------------------


def _slow_tail_upload(sim: Sim, data: bytes, pause: float, trickle: int) -> subprocess.CompletedProcess[bytes]:
    """All but the last bytes, a pause, then the rest (the last ``trickle`` bytes one at a time)."""
    proc = subprocess.Popen(["ssh", *sim._opts(None, "-p"), "-s", "root@127.0.0.1", "fwup"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdin is not None
    head = len(data) - max(trickle, 100)
    proc.stdin.write(data[:head])
    proc.stdin.flush()
    time.sleep(pause)
    if trickle:
        for i in range(head, len(data)):
            proc.stdin.write(data[i : i + 1])
            proc.stdin.flush()
    else:
        proc.stdin.write(data[head:])
    stdout, stderr = proc.communicate(timeout=120)  # closes stdin: the genuine EOF
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize(("pause", "trickle"), [(0.5, 0), (5.0, 0), (0.0, 4096)],
                         ids=["pause-0.5s", "pause-5s", "last-4KiB-byte-by-byte"])  # fmt: skip
async def test_a_late_end_still_succeeds(sim: Sim, firmware, pause: float, trickle: int) -> None:
    result = await anyio.to_thread.run_sync(_slow_tail_upload, sim, firmware("2.0.0").read_bytes(), pause, trickle)
    text = output(result)
    assert result.returncode == 0, text
    assert "Success!" in text and "hot reload: 1.0.0 → 2.0.0" in text, text
    assert sim.app()["version"] == "2.0.0"
    assert sim.env()["nerves_fw_active"] == "b"


# --- a hung fwup: every wait on it is bounded, the lock is released ---------------------------------

APPS = Path(__file__).resolve().parents[1] / "apps"


@pytest.mark.parametrize(("mode", "words"), [("stop-reading", "fwup accepted no data for 2 s"),
                                             ("no-exit", "fwup hung")])  # fmt: skip
async def test_a_hung_fwup_is_stopped_and_the_lock_released(sim: Sim, tmp_path: Path, mode: str, words: str) -> None:
    fake = tmp_path / "fwup"  # a fake: the real fwup cannot be made to hang
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {APPS / 'hung_fwup.py'} {mode} \"$@\"\n")
    fake.chmod(0o755)
    await sim.restart_server(fwup={"path": str(fake)}, server={"idle_timeout": 2})
    payload = zip_payload(tmp_path / "big.fw", 4 * MiB)  # more than the pipe to fwup holds
    started = time.monotonic()
    result = await anyio.to_thread.run_sync(lambda: sim.upload(payload, timeout=60))
    text = output(result)
    # fwup had 4 MiB it may have written: the slot stays marked, and the message says so
    assert result.returncode == 1 and words in text and "slot b (which held no firmware) was" in text, text
    assert "not changed" not in text and sim.env()["b.sshfwup_state"] == "incomplete", text
    assert time.monotonic() - started < 30
    await anyio.to_thread.run_sync(wait_unlocked, sim)
    assert_untouched(sim)
    assert journal(sim)["stage"] == "failed"
    assert subprocess.run(["pgrep", "-f", str(APPS / "hung_fwup.py")], capture_output=True).returncode == 1
