"""The truth after every ending (issue 25 item 2): a refused, cut, failed or rolled-back update says
exactly what changed — the slot, the firmware it held before, and that ``revert`` is no longer
possible — in the uploader's last lines, the device log, and ``status`` (text and JSON: the last
attempt, not only the last success); and each message is checked against the boot env and the
slot's bytes. Real fwup, simulated device: slot a runs 1.0.0, slot b holds a whole 2.0.0 that
``revert`` could boot, and 3.0.0 is uploaded."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

import anyio
import pytest
from conftest import (
    FirmwareFactory,
    Sim,
    env_block,
    journal,
    other_slot_whole,
    output,
    slot_sha256,
    upload,
    wait_unlocked,
    wait_until,
)

FAST = {"app": {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}}
BIG = 1200 * 1024  # filler: fwup writes (and reports progress) long before the upload's end
#: slot b's 2.0.0 is gone: what every ending after fwup began writing must say
OVERWRITTEN = (
    "slot b (2.0.0) was partly overwritten and is marked incomplete: nothing boots it, and revert is no longer "
    "possible until a new upload completes; slot a (1.0.0) still runs and boots next"
)
#: the same when fwup was stopped before it reported a write (its output was still in its buffers)
HANDED = OVERWRITTEN.replace("was partly overwritten", "was handed to fwup and counts as partly overwritten")
NOT_CHANGED = "the device was not changed"


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return FAST


def told(sim: Sim, words: str, *, slot_b: str | None) -> dict[str, Any]:
    """``status --json`` and ``status`` name the last attempt with ``words``, and slot b's mark
    (``slot_b``: None, "incomplete", "rolled-back"); the device log says it too."""
    s = sim.status()
    assert s["last_update"] is not None and s["last_update"]["ok"] is False, s
    assert words in s["last_update"]["verdict"], s["last_update"]
    assert s["slots"]["b"]["state"] == slot_b, s["slots"]
    text = output(sim.ssh("status"))
    assert f"last update:    FAILED: " in text and words in text, text
    row = next(line for line in text.splitlines() if line.startswith("slot b:"))
    assert ("INCOMPLETE: an upload to it was cut or failed" in row) == (slot_b == "incomplete"), row
    assert ("rolled back: it failed" in row) == (slot_b == "rolled-back"), row
    logs = output(sim.ssh("logs", "-n", "400"))
    assert words in logs, logs
    return s


def revert_refused(sim: Sim, why: str) -> None:
    result = sim.ssh("revert")
    assert result.returncode == 1 and why in output(result), output(result)
    assert sim.env()["nerves_fw_active"] == "a"


def assert_b_overwritten(sim: Sim, slot_b_before: str, *, written: bool = True) -> None:
    """The boot env still names 2.0.0 in slot b, marked incomplete, and (``written``: the device
    said it was overwritten) its bytes changed."""
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1", env
    assert env["b.nerves_fw_version"] == "2.0.0" and env["b.sshfwup_state"] == "incomplete", env
    if written:
        assert slot_sha256(sim, "b") != slot_b_before  # really overwritten, as the message says
    assert sim.app()["version"] == "1.0.0"
    revert_refused(sim, "slot b is incomplete: an upload to it was cut or failed after fwup began writing, so "
                        "2.0.0 there is no longer whole; revert is not possible until a new upload completes")


def last_lines(result: subprocess.CompletedProcess[bytes]) -> str:
    return "\n".join(output(result).strip().splitlines()[-2:])


# --- (a) refused before writing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("downgrade", "update refused: 0.9.0 is older than the running 1.0.0 (a downgrade)"),
        ("wrong-platform", "Expecting platform=otherboard and architecture=x86_64"),
        ("pending-reboot", "a reboot is pending: slot b (3.0.0) is installed and boots next"),
    ],
)
async def test_refused_before_writing_says_nothing_changed(sim: Sim, firmware: FirmwareFactory, kind: str,
                                                          says: str) -> None:  # fmt: skip
    await other_slot_whole(sim, firmware)
    data = {
        "downgrade": lambda: firmware("0.9.0"),
        "wrong-platform": lambda: firmware("3.0.0", platform="otherboard"),
        "pending-reboot": lambda: firmware("3.0.1"),
    }[kind]()
    if kind == "pending-reboot":  # 3.0.0 hot-swapped in: slot b boots next, slot a still runs
        assert (await upload(sim, firmware("3.0.0"))).returncode == 0
    block, slot_a, slot_b = env_block(sim), slot_sha256(sim, "a"), slot_sha256(sim, "b")
    result = await upload(sim, data)
    assert result.returncode == 1, output(result)
    assert says in output(result) and last_lines(result).endswith(NOT_CHANGED), output(result)
    assert "partly" not in output(result)
    told(sim, says, slot_b=None)
    assert told(sim, NOT_CHANGED, slot_b=None)
    # as said: the boot env byte for byte, both slots' bytes
    assert env_block(sim) == block and slot_sha256(sim, "a") == slot_a and slot_sha256(sim, "b") == slot_b
    if kind != "pending-reboot":  # the whole 2.0.0 is still there to go back to
        result = sim.ssh("revert")
        assert result.returncode == 0 and "slot b (2.0.0) boots next" in output(result), output(result)


# --- (b) cut while writing --------------------------------------------------------------------


def start_upload(sim: Sim, data: bytes) -> subprocess.Popen[bytes]:
    """``ssh -s fwup`` fed ``data`` and left open (no EOF): the caller cuts it."""
    proc = subprocess.Popen(["ssh", *sim._opts(None, "-p"), "-s", f"{sim.user}@{sim.host}", "fwup"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.flush()
    return proc


async def fwup_writing(sim: Sim) -> None:
    """Until fwup reports writing slot b (progress past 0)."""
    await wait_until(lambda: ((sim.status()["update"] or {}).get("percent") or 0) > 0, what="fwup's progress")


async def test_cut_while_writing_names_the_overwritten_slot(sim: Sim, firmware: FirmwareFactory) -> None:
    await other_slot_whole(sim, firmware)
    slot_b = slot_sha256(sim, "b")
    data = firmware("3.0.0", filler=BIG).read_bytes()
    proc = start_upload(sim, data[: len(data) * 2 // 3])
    await fwup_writing(sim)
    proc.send_signal(signal.SIGKILL)  # the client dies: no EOF, no last lines for it
    seen = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Success!" not in seen and "sshfwup:" not in seen, seen
    await anyio.to_thread.run_sync(wait_unlocked, sim)
    s = told(sim, OVERWRITTEN, slot_b="incomplete")
    assert s["last_update"]["verdict"].startswith("upload aborted: "), s["last_update"]
    assert OVERWRITTEN in journal(sim)["verdict"] and journal(sim)["stage"] == "failed"
    assert_b_overwritten(sim, slot_b)


# --- (c) cut in the held-back tail ------------------------------------------------------------


async def test_cut_in_the_held_back_tail_names_the_overwritten_slot(sim: Sim, firmware: FirmwareFactory) -> None:
    """All but the last 100 bytes and a genuine EOF: fwup had all but the held-back tail, never saw
    the central directory, and was stopped at once — typically before its first report reached
    the server, so the device says the slot counts as overwritten (and its bytes did change)."""
    await other_slot_whole(sim, firmware)
    slot_b = slot_sha256(sim, "b")
    data = firmware("3.0.0", filler=BIG).read_bytes()
    result = await upload(sim, data[:-100])
    assert result.returncode == 1, output(result)
    assert "Success!" not in output(result)
    text = last_lines(result)
    assert "sshfwup: update failed: the upload ended after" in text, text
    assert text.endswith(OVERWRITTEN) or text.endswith(HANDED), text
    written = text.endswith(OVERWRITTEN)
    told(sim, OVERWRITTEN if written else HANDED, slot_b="incomplete")
    assert_b_overwritten(sim, slot_b, written=written)


# --- (d) fwup's error -------------------------------------------------------------------------


async def test_fwup_error_names_the_overwritten_slot(sim: Sim, firmware: FirmwareFactory) -> None:
    await other_slot_whole(sim, firmware)
    slot_b = slot_sha256(sim, "b")
    data = bytearray(firmware("3.0.0", filler=BIG).read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the root filesystem's data: fwup finds out while writing
    result = await upload(sim, bytes(data))
    text = output(result)
    assert result.returncode == 1 and ("ZIP bad CRC" in text or "ZIP decompression failed" in text), text
    assert last_lines(result).endswith(OVERWRITTEN) and "sshfwup: update failed: ZIP " in text, text
    told(sim, OVERWRITTEN, slot_b="incomplete")
    assert_b_overwritten(sim, slot_b)


# --- (e) the new firmware fails after its hot swap ----------------------------------------------


async def test_failed_new_version_names_what_replaced_the_fallback(sim: Sim, firmware: FirmwareFactory) -> None:
    await other_slot_whole(sim, firmware)
    result = await upload(sim, firmware("3.0.0", app_behavior={"never_ready": True}))
    assert result.returncode == 1, output(result)
    words = ("rolled back: 1.0.0 keeps serving; boot env reverted to slot a; slot b held 2.0.0 before and now "
             "holds 3.0.0, marked rolled back: nothing boots it, and revert is no longer possible until a new "
             "upload completes")  # fmt: skip
    assert last_lines(result).endswith(words), output(result)
    told(sim, words, slot_b="rolled-back")
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1", env
    assert env["b.nerves_fw_version"] == "3.0.0" and env["b.sshfwup_state"] == "rolled-back", env
    assert sim.device.read_slot_file("b", "/srv/app/VERSION").decode().strip() == "3.0.0"  # 2.0.0 is gone
    assert sim.app()["version"] == "1.0.0"
    revert_refused(sim, "slot b holds 3.0.0, which failed and was rolled back: refusing to revert to it")


# --- (f) power cut ----------------------------------------------------------------------------


async def test_power_cut_while_writing_names_the_overwritten_slot(sim: Sim, firmware: FirmwareFactory) -> None:
    await other_slot_whole(sim, firmware)
    slot_b = slot_sha256(sim, "b")
    data = firmware("3.0.0", filler=BIG).read_bytes()
    proc = start_upload(sim, data[: len(data) * 2 // 3])
    try:
        await fwup_writing(sim)
        sim.machine.power_cut()
        await sim.machine.wait_boot(2, timeout=60)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    state = sim.machine.state()
    assert state is not None and state.slot == "a"
    # The interrupted fwup had the slot's bytes but may not have reported them: it counts as written.
    words = ("the boot env was not switched; slot b (2.0.0) was handed to fwup and counts as partly overwritten "
             "and is marked incomplete: nothing boots it, and revert is no longer possible until a new upload "
             "completes; slot a (1.0.0) still runs and boots next")  # fmt: skip
    s = told(sim, words, slot_b="incomplete")
    assert "was interrupted at stage 'receiving'" in s["last_update"]["verdict"], s["last_update"]
    assert journal(sim)["stage"] == "interrupted"
    assert_b_overwritten(sim, slot_b, written=False)
