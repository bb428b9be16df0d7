"""Each example layout of deploy/examples (bootcount, nerves-bbb-like, tryboot-like), provisioned
as ``sshfwup sim create --layout`` provisions it (its fwup.conf, its ops.conf, its sshfwup.toml's
[boot]) and driven with the real fwup and server: hot update, proven revert, a refused upload
that changes nothing, reboot update with validation, an unproven revert, a trial boot that never
validates, and the validate command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Sim, output, upload, wait_until

from sshfwup.firmware.keys import load_private_key
from sshfwup.host.firmware_sign import sign_firmware
from sshfwup.boot.fwup_ops import FWUP_DEFAULT_REBOOT_PARAM_PATHS
from sshfwup.sim.layouts import ExampleLayout, build_ops_archive, find_layout
from sshfwup.sim.tryboot import REBOOT_PARAM

LAYOUTS = ["bootcount", "nerves-bbb-like", "tryboot-like"]
FAST = {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}


def layouts(*slow: str) -> pytest.MarkDecorator:
    """Every layout; those named in ``slow`` only with --run-slow (the U-Boot contracts' runs on
    the default layout, tests/boot/test_contracts_sim.py and tests/update/test_refusals.py, cover
    them in the default suite)."""
    params = [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in LAYOUTS]
    return pytest.mark.parametrize("layout", params, indirect=True)


@pytest.fixture
def layout(request: pytest.FixtureRequest) -> ExampleLayout:
    return find_layout(request.param)


@pytest.fixture
def observe() -> float:
    return FAST["observe"]


@pytest.fixture
def sim_firmware(layout: ExampleLayout) -> dict[str, Any]:
    return {"conf": layout.fwup_conf}


@pytest.fixture
def sim_config(layout: ExampleLayout, observe: float, fwup: str, tmp_path: Path) -> dict[str, Any]:
    boot = dict(layout.boot)
    if layout.ops_conf is not None:  # what `sim create --layout` builds into the device directory
        boot["ops_archive"] = str(build_ops_archive(fwup, layout.ops_conf, tmp_path / "ops.fw"))
    return {"app": {**FAST, "observe": observe}, "boot": boot}


def fw(firmware: Any, layout: ExampleLayout, version: str, **kwargs: Any) -> Path:
    return firmware(version, conf=layout.fwup_conf, **kwargs)


def host_reboot_params() -> dict[str, Any]:
    """The host's own reboot parameter files (fwup's defaults): a simulated device never writes them."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) if p.exists() else None for p in FWUP_DEFAULT_REBOOT_PARAM_PATHS}


def boots_next(sim: Sim) -> tuple[str, bool]:
    s = sim.status()
    return s["active"], s["validated"]


def env_data(sim: Sim) -> bytes:
    """The environment block's variables, byte for byte and in order (after the CRC, up to the
    terminating double NUL). Not the padding: fwup pads the block with 0xff, libubootenv with 0x00
    (measured with fwup 1.16.0), so a mark sshfwup writes and takes back with fw_setenv after an
    ops task of fwup's leaves the same variables in a block padded (and so CRC'd) differently."""
    path, offset, size = (sim.device.path / "fw_env.config").read_text().split()[:3]
    with open(path, "rb") as f:
        f.seek(int(offset, 0))
        block = f.read(int(size, 0))
    return block[4 : block.index(b"\0\0", 4) + 2]


def disk_outside_env_and_data(sim: Sim) -> bytes:
    """Every byte of the disk before the app data partition but the env block: MBR, FAT, slots."""
    env_offset, env_size = sim.device.layout.uboot_env_span
    with open(sim.device.disk, "rb") as f:
        head = f.read(env_offset)
        f.seek(env_offset + env_size)
        return head + f.read(sim.device.layout.app_span[0] - env_offset - env_size)


@layouts("bootcount", "nerves-bbb-like")
async def test_hot_update_revert_and_trial_of_a_revert(sim: Sim, firmware, layout: ExampleLayout) -> None:
    assert sim.status()["boot_contract"] == layout.boot["contract"]
    host = host_reboot_params()
    # hot update: the app swaps, the new slot boots next on trial
    result = await upload(sim, fw(firmware, layout, "2.0.0"))
    assert result.returncode == 0 and "hot reload" in output(result), output(result)
    s = sim.status()
    assert s["pending_reboot"] and s["active"] == "b" and s["trial_boot"] and not s["validated"], s
    if layout.boot["contract"] == "fwup-ops":  # reboot_param() wrote inside the device, not the host's /run
        assert (sim.device.path / REBOOT_PARAM).read_text() == "0 tryboot"
    assert host_reboot_params() == host
    # proven revert: the running slot boots next again, no reboot
    result = sim.ssh("revert")
    assert result.returncode == 0 and "no reboot needed" in output(result), output(result)
    assert sim.app()["version"] == "1.0.0" and boots_next(sim) == ("a", True)
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "a"
    # the update again, then a reboot: the trial boots and validates after a healthy boot
    assert (await upload(sim, fw(firmware, layout, "2.0.0"))).returncode == 0
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(3, timeout=30)).slot == "b"
    await wait_until(lambda: boots_next(sim) == ("b", True), what="2.0.0 validated after a healthy boot")
    # an unproven revert: slot a boots once on trial, kept because it validates
    result = sim.ssh("revert")
    assert result.returncode == 0 and "unvalidated until it proves healthy" in output(result), output(result)
    assert sim.status()["trial_boot"] is True and boots_next(sim) == ("a", False)
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(4, timeout=30)).slot == "a"
    await wait_until(lambda: boots_next(sim) == ("a", True), what="1.0.0 validated after its trial")
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(5, timeout=30)).slot == "a"
    if layout.boot["contract"] == "fwup-ops":
        assert "nerves_fw_active" not in sim.env()  # nothing wrote a key this system does not have
    assert host_reboot_params() == host


@layouts()
@pytest.mark.parametrize("observe", [60])
async def test_reboot_update_failed_trial_then_validate(sim: Sim, firmware, layout: ExampleLayout) -> None:
    if layout.boot["contract"] == "uboot-bootcount":
        sim.device.set_env(bootlimit="1")  # one trial boot, like the other two
    v3 = fw(firmware, layout, "3.0.0", changes=("kernel",))
    result = await upload(sim, v3)
    assert result.returncode == 0 and "reboot required" in output(result), output(result)
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "b"
    assert sim.status()["trial_boot"] is True  # observing for 60 s: not validated
    assert sim.ssh("reboot").returncode == 0  # the trial ends unvalidated
    assert (await sim.machine.wait_boot(3, timeout=30)).slot == "a"  # the bootloader fell back
    await wait_until(lambda: sim.app()["version"] == "1.0.0", what="1.0.0 serving again")
    if layout.boot["contract"] == "fwup-ops":  # nothing wrote the fallback: 1.0.0 proves itself again
        assert boots_next(sim) == ("a", False) and sim.status()["trial_boot"] is False
        assert "validated firmware 1.0.0 in slot a" in output(sim.ssh("validate"))
    assert boots_next(sim) == ("a", True)
    # the same update again, validated by the operator during its trial: it stays
    assert (await upload(sim, v3)).returncode == 0
    assert (await sim.machine.wait_boot(4, timeout=30)).slot == "b"
    result = sim.ssh("validate")
    assert result.returncode == 0 and "validated firmware 3.0.0 in slot b" in output(result), output(result)
    assert boots_next(sim) == ("b", True) and sim.status()["trial_boot"] is False
    assert sim.ssh("reboot").returncode == 0
    assert (await sim.machine.wait_boot(5, timeout=30)).slot == "b"


@layouts("bootcount", "nerves-bbb-like")
async def test_every_refusal_changes_nothing(sim: Sim, firmware, firmware_keys: dict[str, Path], tmp_path: Path,
                                             layout: ExampleLayout) -> None:  # fmt: skip
    """Platform, requirements (no task), an unvalidated running firmware, signature: the env's
    variables, every other byte before the data partition (MBR, autoboot FAT, both slots), the
    app and the status stay as they were."""
    assert (await upload(sim, fw(firmware, layout, "2.0.0"))).returncode == 0
    assert sim.ssh("revert").returncode == 0  # slot b holds a whole 2.0.0 to go back to
    v3 = fw(firmware, layout, "3.0.0")
    theirs = sign_firmware(v3, tmp_path / "theirs.fw", load_private_key(firmware_keys["theirs"]))
    cases = [  # (server config, firmware, what is said)
        ({}, fw(firmware, layout, "3.0.0", platform="otherboard"), "Expecting platform=otherboard"),
        ({"fwup": {"task": "upgrade.nosuchslot"}}, v3, "Couldn't find applicable task 'upgrade.nosuchslot'"),
        ({"fwup": {"task": "upgrade"}}, "unvalidated", "is not validated yet"),
        ({"fwup": {"public_keys": [str(firmware_keys["ours.pub"])]}}, v3, "Expecting signed firmware archive"),
        ({}, theirs, "fails digital signature verification"),
    ]
    for config, data, says in cases:
        if config:
            await sim.restart_server(**config)
        if data == "unvalidated":
            sim.device.set_env(nerves_fw_validated="0")  # as during a trial: the running firmware is unproven
            data = v3
        block, disk, app = env_data(sim), disk_outside_env_and_data(sim), sim.status()["app"]
        before = {k: v for k, v in sim.status().items() if k in ("active", "validated", "trial_boot", "slots")}
        result = await upload(sim, data)
        text = output(result)
        assert result.returncode == 1 and says in text, (says, text)
        assert "partly written" not in text, text
        assert env_data(sim) == block, (says, sim.env())  # every key and mark, in order
        assert disk_outside_env_and_data(sim) == disk, says
        now = sim.status()
        assert now["app"]["pid"] == app["pid"] and not now["update_in_progress"], says
        assert {k: v for k, v in now.items() if k in before} == before, (says, before, now)
        if data is v3 and says == "is not validated yet":
            sim.device.set_env(nerves_fw_validated="1")
    result = sim.ssh("revert")  # the whole firmware in slot b is still there to go back to
    assert result.returncode == 0 and "slot b (2.0.0) boots next" in output(result), output(result)


@pytest.mark.parametrize("layout", ["tryboot-like"], indirect=True)
async def test_a_power_cut_loses_a_pending_tryboot(sim: Sim, firmware, layout: ExampleLayout) -> None:
    """The tryboot flag lives in RAM (the reboot parameter under /run): only a reboot hands it to
    the firmware. After a power cut the default slot boots and the update is no longer pending."""
    assert (await upload(sim, fw(firmware, layout, "2.0.0"))).returncode == 0
    assert boots_next(sim) == ("b", False)
    sim.machine.power_cut()
    assert (await sim.machine.wait_boot(2, timeout=30)).slot == "a"
    assert not (sim.device.path / REBOOT_PARAM).exists()
    s = sim.status()
    assert s["active"] == "a" and not s["pending_reboot"] and not s["trial_boot"], s
    # the old firmware proves itself again, and status keeps saying the update did not take
    await wait_until(lambda: sim.status()["validated"], timeout=60, what="slot a validated again")
    last = sim.status()["last_update"]
    assert last["ok"] is False and "fell back to slot a" in last["verdict"] and "2.0.0 in slot b" in last["verdict"], last
