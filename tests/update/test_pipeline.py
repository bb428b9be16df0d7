"""The zero-downtime pipeline end to end on the simulated device: hot swap, reboot, rollback,
pending reboot, validation at boot, recovery from a crash or power cut at every stage."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Sim, journal, output, upload, wait_until
from httpload import Load

from sshfwup.sim.device import marked_processes

FAST = {"app": {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}}
SERVE_WITH_FAULT = Path(__file__).resolve().parents[1] / "apps" / "serve_with_fault.py"


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return FAST


def app_processes(sim: Sim) -> list[int]:
    """Every application process on the device (the sample app runs as ``python …/app.py``)."""
    pids = []
    for pid in marked_processes(sim.device.path):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"/srv/app/app.py") for part in cmd):
            pids.append(pid)
    return pids


def slot_mounts(sim: Sim) -> list[str]:
    run = str(sim.device.run_dir / "slots")
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines() if line.split()[4].startswith(run)]


async def fault_at(sim: Sim, stage: str, action: str = "kill") -> None:
    """Restart the server under the test entry point that kills (or hangs) it right after the
    journal records ``stage`` — once (the seam is journal.StageHook; production has none)."""
    once = sim.device.path / f"fault-{stage}-{action}.fired"
    sim.device.set_server_command(
        [sys.executable, str(SERVE_WITH_FAULT), stage, action, str(once), "--config", "{config}"]
    )
    await sim.restart_server()


# --- hot swap --------------------------------------------------------------------------------


async def test_hot_update_under_load_fails_no_request(sim: Sim, firmware) -> None:
    v1 = sim.app()
    load = Load(sim.app_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(load.run)
        await anyio.sleep(1.0)
        result = await upload(sim, firmware("2.0.0"))
        done = time.monotonic()
        await anyio.sleep(1.0)
        load.running = False
    text = output(result)
    assert result.returncode == 0, text
    assert "sshfwup: hot reload: 1.0.0 → 2.0.0 in" in text and "0 connections refused" in text, text
    assert load.failures == [], load.failures[:5]
    assert len(load.answers) >= 300, len(load.answers)
    versions = [v for _, v in load.answers]
    assert versions[0] == "1.0.0" and versions[-1] == "2.0.0"
    assert {v for began, v in load.answers if began > done} == {"2.0.0"}
    # the app runs the new code from the new slot, with no reboot
    now = sim.app()
    assert now["version"] == "2.0.0" and now["slot"] == "b" and now["pid"] != v1["pid"]
    assert sim.machine.state().boot_count == 1
    status = sim.status()
    assert status["pending_reboot"] and status["running_root"] == "a" and status["active"] == "b"
    assert not status["validated"]  # it has not booted yet: the bootloader's fallback stays armed
    assert status["app"]["version"] == "2.0.0" and status["app"]["slot"] == "b"
    assert journal(sim)["stage"] == "hot"
    assert slot_mounts(sim) == [str(sim.device.run_dir / "slots" / "b")]
    assert len(app_processes(sim)) == 1  # the old version is gone


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "strategy": "stop-first"}}])
async def test_stop_first_swap(sim: Sim, firmware) -> None:
    result = await upload(sim, firmware("2.0.0"))
    assert result.returncode == 0, output(result)
    assert "(stop-first)" in output(result)
    assert sim.app()["version"] == "2.0.0"


# --- rollback ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behavior", "extra", "reason"),
    [
        ({"never_ready": True}, {}, "did not become ready within 3 s"),
        ({"crash_after": 0.3}, {}, "during the observation window"),
        ({"unhealthy_after": 0.3}, {"ready": "http"}, "health check"),
        # the reproduction: READY=1, a port of its own, and the public port hangs
        ({"own_port": True}, {}, "said READY=1 after"),
        # notify readiness is checked during the window too: its accept loop died, the process lives
        ({"stop_accepting_after": 0.6}, {}, "stopped accepting connections on its public socket http"),
    ],
    ids=["never-ready", "crash", "unhealthy", "own-port", "stops-accepting"],
)
async def test_failed_new_version_rolls_back(sim: Sim, firmware, behavior: dict, extra: dict, reason: str) -> None:
    if extra:
        await sim.restart_server(app={**FAST["app"], **extra})
    before = sim.app()
    result = await upload(sim, firmware("2.0.0", app_behavior=behavior))
    text = output(result)
    assert result.returncode == 1, text
    assert "hot reload failed" in text and reason in text, text
    assert "rolled back: 1.0.0 keeps serving; boot env reverted to slot a" in text, text
    assert "connections refused" not in text
    after = sim.app()
    assert after["version"] == "1.0.0"
    if "never_ready" in behavior or "own_port" in behavior:
        assert after["pid"] == before["pid"]  # overlap: the old one never stopped
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1"
    assert slot_mounts(sim) == [] and len(app_processes(sim)) == 1
    assert journal(sim)["stage"] == "rolled-back"
    # the next upload of a good firmware succeeds
    good = await upload(sim, firmware("2.0.1"))
    assert good.returncode == 0, output(good)
    assert sim.app()["version"] == "2.0.1"


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "revert_on_failure": False}}])
async def test_rollback_can_leave_the_new_firmware_for_the_next_boot(sim: Sim, firmware) -> None:
    result = await upload(sim, firmware("2.0.0", app_behavior={"never_ready": True}))
    assert result.returncode == 1
    assert "slot b (2.0.0) still boots next" in output(result), output(result)
    assert sim.env()["nerves_fw_active"] == "b" and sim.app()["version"] == "1.0.0"


# --- reboot -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"changes": ("kernel",)}, "kernel changed"),
        ({"changes": ("dtb",)}, "device tree changed"),
        ({"changes": ("interpreter",)}, "interpreter changed"),
        ({"changes": ("native-app",)}, "native code in the app changed"),
        ({"changes": ("system-file",)}, "/etc changed"),
        ({"changes": ("modules",)}, "/lib/modules changed"),
        ({"hot": None}, "HOT_RELOAD marker missing"),
        ({"manifest": False}, "manifest missing in the new firmware"),
    ],
    ids=["kernel", "dtb", "interpreter", "so-in-app", "system-file", "modules", "no-marker", "no-manifest"],
)
async def test_each_reboot_reason_reboots_into_the_new_firmware(sim: Sim, firmware, kwargs: dict, reason: str) -> None:
    result = await upload(sim, firmware("3.0.0", **kwargs))
    text = output(result)
    assert result.returncode == 0, text
    assert "sshfwup: reboot required:" in text and reason in text, text
    assert "rebooting into 3.0.0 (slot b)" in text
    state = await sim.machine.wait_boot(2, timeout=30)
    assert state.slot == "b"
    assert sim.app()["version"] == "3.0.0"


async def test_the_new_firmware_does_not_choose_its_own_inspection(sim: Sim, tmp_path: Path) -> None:
    """The issue's attack: a manifest that excludes /etc and /boot and calls an ELF "not
    native", with a new kernel and an ELF in the app. The device's policy decides: reboot."""
    from sshfwup.firmware.manifest import MANIFEST_PATH
    from sshfwup.sim.firmware import build_firmware
    from sshfwup.sim.rootfs import make_rootfs

    staging = make_rootfs(tmp_path / "claims.rootfs", version="3.0.0", changes=("kernel", "app-executable"))
    manifest = staging / MANIFEST_PATH.lstrip("/")
    doc = json.loads(manifest.read_text())
    doc["excluded"] += ["/etc", "/boot"]
    doc["entries"]["/srv/app/helper"]["native"] = False
    manifest.write_text(json.dumps(doc))
    fw = build_firmware(staging, tmp_path / "claims.fw", version="3.0.0")
    result = await upload(sim, fw)
    text = output(result)
    assert result.returncode == 0, text
    assert "reboot required: kernel changed, native code in the app changed (/srv/app/helper)" in text, text
    await sim.machine.wait_boot(2, timeout=30)


async def test_reboot_then_validation(sim: Sim, firmware) -> None:
    assert (await upload(sim, firmware("2.0.0"))).returncode == 0  # hot, reboot pending
    result = sim.ssh("reboot")
    assert result.returncode == 0 and "rebooting" in output(result)
    state = await sim.machine.wait_boot(2, timeout=30)
    assert state.slot == "b"
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="validation after a healthy boot")
    status = sim.status()
    assert status["running_root"] == "b" and status["active"] == "b" and not status["pending_reboot"]
    assert status["app"]["slot"] == "b" and status["app"]["root"] == str(sim.device.root_dir)
    assert journal(sim)["stage"] == "validated"
    # and now the next update goes to slot a
    result = await upload(sim, firmware("3.0.0"))
    assert result.returncode == 0 and "slot a" in output(result), output(result)


async def test_pending_reboot_refuses_the_next_upload(sim: Sim, firmware) -> None:
    assert (await upload(sim, firmware("2.0.0"))).returncode == 0
    env = sim.env()
    slot_a = sim.device.slot_bytes_sha256("a", 1 << 20)
    result = await upload(sim, firmware("3.0.0"))
    text = output(result)
    assert result.returncode == 1, text
    assert "Error: a reboot is pending" in text and "ssh <device> reboot" in text, text
    assert "fwup:" not in text  # refused before a byte reached fwup
    assert sim.env() == env and sim.device.slot_bytes_sha256("a", 1 << 20) == slot_a
    assert sim.app()["version"] == "2.0.0"


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "ready_timeout": 2}}])
@pytest.mark.parametrize("behavior", [{"never_ready": True}, {"own_port": True}], ids=["never-ready", "own-port"])
async def test_unvalidated_firmware_that_fails_after_boot_falls_back(sim: Sim, firmware, behavior: dict) -> None:
    fw = firmware("3.0.0", changes=("system-file",), app_behavior=behavior)
    result = await upload(sim, fw)
    assert result.returncode == 0 and "reboot required" in output(result)
    state = await sim.machine.wait_boot(3, timeout=60)  # boot 2: 3.0.0 fails; boot 3: back on a
    assert state.slot == "a"
    await wait_until(lambda: sim.app()["version"] == "1.0.0", what="1.0.0 serving again")
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1"
    assert env["b.sshfwup_state"] == "rolled-back"


# --- crash or power cut at every stage ------------------------------------------------------


@pytest.mark.parametrize("stage", ["receiving", "applied", "mounted", "inspected", "swapping"])
async def test_kill_9_during_an_update_restores_the_old_firmware(sim: Sim, firmware, stage: str) -> None:
    await fault_at(sim, stage)
    result = await upload(sim, firmware("2.0.0"))
    assert result.returncode != 0  # the server died under the uploader
    await sim.machine.wait_state(lambda s: s.server_restarts >= 2 and s.ready, timeout=30)
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1", env
    assert sim.app()["version"] == "1.0.0"
    assert slot_mounts(sim) == [] and len(app_processes(sim)) == 1
    assert journal(sim)["stage"] == "interrupted"
    assert not sim.status()["update_in_progress"]
    good = await upload(sim, firmware("2.0.0"))  # the next update is possible
    assert good.returncode == 0, output(good)


async def test_kill_9_after_a_hot_swap_resumes_the_new_version(sim: Sim, firmware) -> None:
    await fault_at(sim, "hot")
    await upload(sim, firmware("2.0.0"))
    await sim.machine.wait_state(lambda s: s.server_restarts >= 2 and s.ready, timeout=30)
    assert sim.app() | {"pid": 0} == {"version": "2.0.0", "slot": "b", "pid": 0}
    status = sim.status()
    assert status["pending_reboot"] and status["app"]["slot"] == "b"
    assert slot_mounts(sim) == [str(sim.device.run_dir / "slots" / "b")] and len(app_processes(sim)) == 1


async def test_kill_9_before_a_requested_reboot_reboots(sim: Sim, firmware) -> None:
    await fault_at(sim, "reboot")
    await upload(sim, firmware("3.0.0", changes=("kernel",)))
    state = await sim.machine.wait_boot(2, timeout=40)
    assert state.slot == "b"
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="validation")
    assert sim.app()["version"] == "3.0.0"


async def test_power_cut_during_a_swap_boots_the_new_firmware_safely(sim: Sim, firmware) -> None:
    await fault_at(sim, "swapping", "pause")
    async with anyio.create_task_group() as tg:
        tg.start_soon(upload, sim, firmware("2.0.0"))
        await wait_until(lambda: journal(sim)["stage"] == "swapping", what="the swap to start")
        sim.machine.power_cut()
    state = await sim.machine.wait_boot(2, timeout=40)
    assert state.slot == "b"  # fwup had finished: the bootloader runs the new firmware
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="validation")
    assert sim.app()["version"] == "2.0.0"
    assert journal(sim)["stage"] == "validated"


# --- device commands --------------------------------------------------------------------------


async def test_status_commands(sim: Sim, firmware) -> None:
    text = sim.ssh("status")
    assert text.returncode == 0
    assert "running root:   slot a\n" in output(text) and "app:            1.0.0 from slot a" in output(text)
    s = sim.status()
    assert s["running_root"] == "a" and s["active"] == "a" and s["validated"] is True
    assert s["slots"]["a"]["version"] == "1.0.0" and s["slots"]["b"]["version"] is None
    assert s["app"]["pid"] == sim.app()["pid"] and s["app"]["uptime"] >= 0
    assert s["pending_reboot"] is False and s["last_update"] is None
    await upload(sim, firmware("2.0.0"))
    s = sim.status()
    assert s["last_update"]["ok"] and "hot reload" in s["last_update"]["verdict"]
    assert "pending reboot: yes: slot b runs after the next reboot" in output(sim.ssh("status"))


async def test_revert_after_a_hot_swap_needs_no_reboot(sim: Sim, firmware) -> None:
    await upload(sim, firmware("2.0.0"))
    refused = sim.ssh("validate")
    assert refused.returncode == 1 and "has not booted yet" in output(refused)
    result = sim.ssh("revert")
    assert result.returncode == 0 and "no reboot needed" in output(result), output(result)
    assert sim.app()["version"] == "1.0.0"
    s = sim.status()
    assert not s["pending_reboot"] and s["active"] == "a" and s["validated"]
    assert slot_mounts(sim) == [] and sim.machine.state().boot_count == 1
    assert (await upload(sim, firmware("2.0.1"))).returncode == 0  # updates work again


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "observe": 60}}])
async def test_validate_command(sim: Sim, firmware) -> None:
    await upload(sim, firmware("3.0.0", changes=("kernel",)))
    await sim.machine.wait_boot(2, timeout=30)
    assert sim.env()["nerves_fw_validated"] == "0"  # still inside the 60 s observation window
    result = sim.ssh("validate")
    assert result.returncode == 0 and "validated firmware 3.0.0 in slot b" in output(result)
    assert sim.env()["nerves_fw_validated"] == "1"


async def test_the_service_manager_hears_ready_and_status(sim: Sim, firmware) -> None:
    """The machine plays systemd: it listens on NOTIFY_SOCKET like Type=notify would."""
    await upload(sim, firmware("2.0.0"))
    log = sim.machine.log_path.read_text()
    assert "sd_notify from the server: READY=1 | STATUS=listening on port" in log
    assert "STATUS=receiving firmware from root@127.0.0.1:" in log and "STATUS=fwup: applied" in log
    assert "STATUS=swapping the app to 2.0.0" in log
    assert "STATUS=running 2.0.0 (hot); reboot pending" in log


async def test_uploader_vanishing_mid_pipeline_leaves_a_consistent_device(sim: Sim, firmware) -> None:
    """The upload was complete (EOF sent); the uploader drops the connection during the swap.
    The device must finish (or roll back) on its own, never stop half-way."""
    import asyncssh

    async with asyncssh.connect(
        "127.0.0.1", sim.port, username="root", client_keys=[str(sim.key.private)], known_hosts=None
    ) as conn:
        proc = await conn.create_process(subsystem="fwup", encoding=None)
        proc.stdin.write(firmware("2.0.0").read_bytes())
        proc.stdin.write_eof()
        seen = b""
        while b"swapping" not in seen:
            chunk = await proc.stdout.read(4096)
            assert chunk, seen
            seen += chunk
        conn.abort()  # gone, without a goodbye
    await wait_until(lambda: journal(sim)["stage"] in ("hot", "rolled-back"), what="the update to settle")
    assert journal(sim)["stage"] == "hot"
    assert sim.app()["version"] == "2.0.0" and len(app_processes(sim)) == 1
    assert not sim.status()["update_in_progress"]


# --- slots are known, not assumed ----------------------------------------------------------------


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "ready_timeout": 2}}])
async def test_revert_refuses_a_firmware_that_was_rolled_back(sim: Sim, firmware) -> None:
    result = await upload(sim, firmware("2.0.0", app_behavior={"never_ready": True}))
    assert result.returncode == 1 and "rolled back" in output(result)
    env = sim.env()
    assert env["b.sshfwup_state"] == "rolled-back" and env["nerves_fw_active"] == "a"
    refused = sim.ssh("revert")
    assert refused.returncode == 1 and "failed and was rolled back" in output(refused), output(refused)
    assert sim.env() == env  # nothing written: the bootloader's fallback stays on, slot a boots
    good = await upload(sim, firmware("2.0.1"))  # a new firmware for slot b clears the mark
    assert good.returncode == 0 and "b.sshfwup_state" not in sim.env(), output(good)


async def test_revert_refuses_a_slot_an_interrupted_upload_overwrote(sim: Sim, firmware) -> None:
    """The brick of the issue: slot b still described as 2.0.0 in the env, but partly overwritten."""
    assert (await upload(sim, firmware("2.0.0"))).returncode == 0
    assert sim.ssh("revert").returncode == 0  # back on 1.0.0; slot b holds a whole 2.0.0
    big = firmware("2.1.0", filler=1200 * 1024).read_bytes()
    cut = await upload(sim, big[: len(big) - 100_000])  # fwup wrote ~900 KB of slot b, then the end never came
    assert cut.returncode == 1, output(cut)
    env = sim.env()
    assert env["b.nerves_fw_version"] == "2.0.0" and env["b.sshfwup_state"] == "incomplete"
    refused = sim.ssh("revert")
    assert refused.returncode == 1 and "slot b is incomplete" in output(refused), output(refused)
    assert sim.env() == env and env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1"


async def test_revert_to_the_other_slot_boots_it_unvalidated(sim: Sim, firmware) -> None:
    assert (await upload(sim, firmware("2.0.0"))).returncode == 0
    assert sim.ssh("reboot").returncode == 0
    await sim.machine.wait_boot(2, timeout=30)
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="2.0.0 validated")
    result = sim.ssh("revert")
    assert result.returncode == 0 and "unvalidated until it proves healthy" in output(result), output(result)
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "0" and env["upgrade_available"] == "1"
    assert sim.ssh("reboot").returncode == 0
    state = await sim.machine.wait_boot(3, timeout=30)
    assert state.slot == "a"
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="1.0.0 validated again after a healthy boot")
    assert sim.app()["version"] == "1.0.0"


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "observe": 60}}])
async def test_no_upload_while_the_running_firmware_is_unvalidated(sim: Sim, firmware) -> None:
    """Found by the model: the fallback slot of an unvalidated firmware must never be written (or
    marked incomplete) — a bad boot would then have nowhere to go."""
    await upload(sim, firmware("3.0.0", changes=("kernel",)))
    await sim.machine.wait_boot(2, timeout=30)
    env = sim.env()
    assert env["nerves_fw_validated"] == "0" and env["nerves_fw_active"] == "b"
    slot_a = sim.device.slot_bytes_sha256("a", 1 << 20)
    result = await upload(sim, firmware("4.0.0"))
    text = output(result)
    assert result.returncode == 1 and "is not validated yet" in text and "ssh <device> validate" in text, text
    assert sim.env() == env and sim.device.slot_bytes_sha256("a", 1 << 20) == slot_a
    assert sim.ssh("validate").returncode == 0
    assert (await upload(sim, firmware("4.0.0"))).returncode == 0  # once validated, it goes through


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "observe": 4}}])
async def test_a_revert_during_the_observation_window_is_not_validated_over(sim: Sim, firmware) -> None:
    """Found by the model: the boot validation decided on the env read before its observation window,
    and validated the slot an operator had reverted to in the meantime (a firmware that never booted)."""
    await upload(sim, firmware("3.0.0", changes=("kernel",)))
    await sim.machine.wait_boot(2, timeout=30)
    assert sim.env()["nerves_fw_validated"] == "0"
    result = sim.ssh("revert")  # inside the 4 s window
    assert result.returncode == 0, output(result)
    await anyio.sleep(6)  # past the window
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "0", env
    assert sim.status()["validated"] is False
