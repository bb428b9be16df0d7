"""update.Update through a simulated device: what the upload says it is, read before fwup runs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import (
    B_MARKED, KeyPair, Sim, assert_applied, assert_untouched, journal, output, upload,
    wait_unlocked, wait_until,
)

from sshfwup.firmware.archive import read_firmware
from sshfwup.host.firmware_delta import make_patch
from sshfwup.update.fwhead import read_head_bytes, version_key
from sshfwup.firmware.inspect import Verdict, with_resources
from sshfwup.sim.device import SimDevice, cleanup
from sshfwup.sim.firmware import build_firmware, reference_conf
from sshfwup.sim.host import free_port
from sshfwup.sim.machine import SimMachine
from sshfwup.sim.rootfs import make_rootfs


async def test_the_firmware_already_running_changes_nothing(sim: Sim, firmware) -> None:
    v1 = firmware("1.0.0")  # the device was flashed with this very file
    for send in (lambda: sim.upload(v1), lambda: sim.scp(v1), lambda: sim.scp(v1, legacy=True)):
        result = send()
        text = output(result)
        assert result.returncode == 0, text
        assert "already running 1.0.0" in text and "nothing changed" in text, text
        assert "\nfwup:" not in text and "Success!" not in text  # fwup never ran
        assert_untouched(sim)
        status = sim.status()
        assert not status["pending_reboot"] and status["last_update"]["ok"]
    record = journal(sim)
    assert record["stage"] == "unchanged" and record["to_version"] == "1.0.0"
    assert_applied(sim, sim.upload(firmware("2.0.0")))  # a real update still goes through


async def test_a_rebuilt_same_version_is_a_different_firmware(sim: Sim, firmware) -> None:
    """Same version string, different build (uuid): not skipped."""
    other = firmware("1.0.0", app_behavior={"note": "rebuilt"})
    result = sim.upload(other)
    assert result.returncode == 0, output(result)
    assert "already running" not in output(result) and "Success!" in output(result)


def test_the_head_is_read_from_the_first_bytes(firmware) -> None:
    data = firmware("1.0.0").read_bytes()
    head = read_head_bytes(data[:4096])
    assert head is not None and head.version == "1.0.0" and head.platform == "sshfwup-sim"
    assert [name for name, _, _ in head.resources] == ["rootfs.img"]
    assert read_head_bytes(data[:100]) is None  # not there yet
    assert read_head_bytes(b"PK\x03\x04" + bytes(500), final=True) is None


async def test_a_downgrade_is_refused_unless_allowed(sim: Sim, firmware) -> None:
    old = firmware("0.9.0")
    result = sim.upload(old)
    text = output(result)
    assert result.returncode == 1 and "0.9.0 is older than the running 1.0.0 (a downgrade)" in text, text
    assert "allow_downgrade" in text and "Success!" not in text
    assert_untouched(sim)
    assert "b.sshfwup_state" not in sim.env()  # refused before fwup saw a byte
    await sim.restart_server(update={"allow_downgrade": True})
    result = sim.upload(old)
    assert result.returncode == 0 and "downgrade to 0.9.0: hot reload" in output(result), output(result)
    assert sim.app()["version"] == "0.9.0"


def test_versions_compare_number_by_number() -> None:
    assert version_key("1.10.0") > version_key("1.9.2") > version_key("1.9")
    assert version_key("2.0.0") == version_key("2.0.0")


# --- delta patches (sshfwup firmware delta) through the real fwup --------------------------------


FAST = {"app": {"ready_timeout": 5, "observe": 1, "drain_timeout": 3}}


@pytest.fixture
def patches(tmp_path: Path) -> Callable[[Path, Path], Path]:
    made: list[Path] = []

    def make(old: Path, new: Path) -> Path:
        made.append(make_patch(old, new, tmp_path / f"patch{len(made)}.fw").path)
        return made[-1]

    return make




def slot_b(sim: Sim) -> str:
    """sha256 of all of slot b, read from the disk image."""
    return sim.device.slot_bytes_sha256("b", sim.device.layout.slot_span("b")[1])


@pytest.mark.parametrize("sim_config", [FAST])
async def test_a_delta_patch_is_applied_and_hot_swapped(sim: Sim, firmware, patches) -> None:
    patch = patches(firmware("1.0.0"), firmware("2.0.0"))
    assert patch.stat().st_size < firmware("2.0.0").stat().st_size
    result = await upload(sim, patch)
    text = output(result)
    assert_applied(sim, result, "2.0.0")  # fwup decoded the patch against slot a into slot b
    assert "sshfwup: hot reload: 1.0.0 → 2.0.0 in" in text, text
    assert sim.app()["version"] == "2.0.0" and sim.status()["app"]["slot"] == "b"
    new = read_firmware(firmware("2.0.0"))
    assert sim.env()["b.nerves_fw_uuid"] == new.uuid  # the patch installs NEW itself
    assert sim.device.slot_bytes_sha256("b", new.meta.resources["rootfs.img"].length) == hashlib.sha256(
        zipfile.ZipFile(firmware("2.0.0")).read("data/rootfs.img")).hexdigest()


@pytest.mark.parametrize("sim_config", [FAST])
async def test_a_delta_patch_with_a_reboot_verdict_boots_the_new_firmware(sim: Sim, firmware, patches) -> None:
    assert sim.status()["running_uuid"] == read_firmware(firmware("1.0.0")).uuid
    patch = patches(firmware("1.0.0"), firmware("3.0.0", changes=("system-file",)))
    result = await upload(sim, patch)
    text = output(result)
    assert result.returncode == 0, text
    assert "sshfwup: reboot required: /etc changed" in text and "rebooting into 3.0.0 (slot b)" in text, text
    state = await sim.machine.wait_boot(2, timeout=30)
    assert state.slot == "b" and sim.app()["version"] == "3.0.0"
    assert sim.status()["running_uuid"] == read_firmware(firmware("3.0.0", changes=("system-file",))).uuid


async def test_a_patch_for_another_firmware_is_refused_before_fwup_sees_a_byte(sim: Sim, firmware, patches) -> None:
    other = firmware("1.0.0", app_behavior={"note": "another build of 1.0.0"})
    patch = patches(other, firmware("2.0.0"))
    env, b_before = sim.env(), slot_b(sim)
    running = read_firmware(firmware("1.0.0")).uuid
    for send in (lambda: sim.upload(patch), lambda: sim.scp(patch), lambda: sim.sftp(f"put {patch} /fwup\n")):
        result = await anyio.to_thread.run_sync(send)
        text = output(result)
        assert result.returncode == 1, text
        assert not re.search(r"^fwup:", text, re.M) and "Success!" not in text, text  # fwup never got a byte
        record = journal(sim)
        assert record["stage"] == "failed", record
        verdict = record["verdict"]
        assert f"a delta patch to 2.0.0 for firmware 1.0.0 (uuid {read_firmware(other).uuid})" in verdict
        assert f"the device runs 1.0.0 (uuid {running}) in slot a" in verdict and "not changed" in verdict
        assert "a delta patch to 2.0.0 for firmware 1.0.0" in text, text  # the uploader is told why
        await anyio.to_thread.run_sync(wait_unlocked, sim)
        assert sim.status()["last_update"] == {"ok": False, "verdict": verdict}
        assert sim.env() == env and slot_b(sim) == b_before  # nothing written, not even slot b
        assert sim.app()["version"] == "1.0.0"
    assert_applied(sim, await upload(sim, patches(firmware("1.0.0"), firmware("2.0.0"))))  # the right one applies


@pytest.mark.parametrize("damage", ["flipped-byte", "lying-source"])
async def test_a_corrupted_patch_is_refused_by_fwup_and_changes_nothing(
    sim: Sim, firmware, patches, damage: str
) -> None:
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    if damage == "flipped-byte":
        data = bytearray(patches(v1, v2).read_bytes())
        data[len(data) - 2048] ^= 0x01  # inside the patched rootfs.img entry
    else:
        # a well-formed patch made from another firmware that claims to be for the running one:
        # the source field is not signed, fwup's check of the decoded bytes is what counts
        data = bytearray(patches(firmware("1.0.0", app_behavior={"note": "other"}), v2).read_bytes())
        other, running = (uuid.UUID(read_firmware(fw).uuid).bytes
                          for fw in (firmware("1.0.0", app_behavior={"note": "other"}), v1))  # fmt: skip
        assert data.count(other) == 2  # the local and the central header
        data = bytearray(data.replace(other, running))
    env = sim.env()
    result = await upload(sim, bytes(data))
    text = output(result)
    assert result.returncode == 1, text
    assert "sshfwup: update failed:" in text and B_MARKED in text, text
    assert "not changed" not in text, text  # it was: fwup wrote part of slot b
    expected = "ZIP bad CRC" if damage == "flipped-byte" else "mismatch"
    assert expected in text or "xdelta3" in text, text
    after = sim.env()
    # fwup wrote part of slot b before it found the damage: sshfwup marked it incomplete first
    assert after.pop("b.sshfwup_state", None) == "incomplete"
    assert after == env, "fwup changed the boot environment"
    assert_untouched(sim)
    assert journal(sim)["stage"] == "failed" and sim.app()["version"] == "1.0.0"


async def test_a_cut_delta_upload_commits_nothing(sim: Sim, firmware, patches) -> None:
    patch = patches(firmware("1.0.0"), firmware("2.0.0")).read_bytes()
    n = len(patch)
    env = sim.env()
    for offset in (100, n // 2, n - 4096, n - 100, n - 22, n - 1):  # meta.conf, the patch, the central directory
        result = await upload(sim, patch[:offset])
        text = output(result)
        assert result.returncode == 1 and "the device was not changed" in text, (offset, text)
        assert sim.env() == env, offset
        assert journal(sim)["stage"] == "failed" and sim.app()["version"] == "1.0.0"
    assert_applied(sim, await upload(sim, patch))


async def test_the_head_is_read_whatever_the_size_of_the_first_chunk(sim: Sim, firmware, patches) -> None:
    """A transport may hand over more than the 256 KiB hold-back in one piece (asyncssh reads up to
    a receive window): the head must still be read from the upload's first bytes."""
    from sshfwup.config import load_config
    from sshfwup.device import Device
    from sshfwup.update.holdback import HOLD
    from sshfwup.update.report import Report
    from sshfwup.update.update import Update, Uploader, UpdateRefused

    wrong = patches(firmware("1.0.0", app_behavior={"note": "other"}), firmware("2.0.0", filler=600 * 1024))
    data = wrong.read_bytes()
    assert len(data) > HOLD
    env, b_before = sim.env(), slot_b(sim)
    device = Device(load_config(sim.device.config_path))  # the same device, driven in this process
    with pytest.raises(UpdateRefused, match="a delta patch to 2.0.0 for firmware 1.0.0"):
        async with Update(device, Uploader("root", "-", "local", "test"), Report()) as update:
            await update.write(data)  # all of it at once
            await update.finish()
    assert sim.env() == env and slot_b(sim) == b_before


# --- everything the .fw installs counts (a kernel resource beside the root filesystem) ----------

def kernel_conf(out: Path) -> Path:
    """deploy/fwup.conf plus a zImage resource, written raw past the root filesystem in the slot
    being written (in place of a kernel on a boot partition)."""
    text = reference_conf().read_text()
    text = text.replace("file-resource rootfs.img {", "file-resource zImage {\n    host-path = ${ZIMAGE}\n}\n\nfile-resource rootfs.img {", 1)
    for slot, block in (("A", 64096), ("B", 129632)):  # 60000 blocks into the slot: far past the squashfs
        marker = f"        raw_write(${{ROOTFS_{slot}_PART_OFFSET}})\n    }}\n"
        assert marker in text
        text = text.replace(marker, marker + f"    on-resource zImage {{ raw_write({block}) }}\n")
    out.write_text(text)
    return out


@pytest.fixture
async def kernel_sim(tmp_path: Path, client_key: KeyPair, fwup: str) -> AsyncIterator[tuple[Sim, Callable[..., Path]]]:
    """A device flashed with firmware that also writes a kernel resource (zImage) outside the rootfs."""
    made: dict[str, Path] = {}
    conf = kernel_conf(tmp_path / "kernel-fwup.conf")

    def build(version: str, kernel: bytes, **rootfs: Any) -> Path:
        work = tmp_path / "fw" / version
        work.mkdir(parents=True)
        (work / "zImage").write_bytes(kernel)
        staging = make_rootfs(work / "rootfs", version=version, **rootfs)
        made[version] = build_firmware(staging, work / f"{version}.fw", version=version, conf=conf,
                                       variables={"ZIMAGE": str(work / "zImage")})  # fmt: skip
        return made[version]

    path = tmp_path / "device"
    try:
        device = SimDevice.create(path, firmware=build("1.0.0", b"kernel one" * 400),
                                  authorized_keys=[client_key.public_line], ssh_port=free_port(), app_port=free_port())  # fmt: skip
        async with SimMachine.start(device.path) as machine:
            await machine.wait_up(timeout=60)
            yield Sim(device, machine, client_key), build
    finally:
        cleanup(path)


async def test_a_new_kernel_resource_means_reboot_even_when_the_rootfs_is_app_only(kernel_sim) -> None:
    sim, build = kernel_sim
    same_kernel = build("1.1.0", b"kernel one" * 400)
    result = await upload(sim, same_kernel)
    assert result.returncode == 0 and "hot reload: 1.0.0 → 1.1.0" in output(result), output(result)
    assert sim.ssh("reboot").returncode == 0
    await sim.machine.wait_boot(2, timeout=60)
    await wait_until(lambda: sim.env()["nerves_fw_validated"] == "1", what="1.1.0 validated")
    new_kernel = build("1.2.0", b"kernel two" * 400)
    result = await upload(sim, new_kernel)
    text = output(result)
    assert result.returncode == 0, text
    assert "reboot required: firmware resource zImage changed" in text, text
    # the offline diff says the same
    diff = subprocess.run([sys.executable, "-m", "sshfwup", "firmware", "diff", str(same_kernel), str(new_kernel), "--json"],
                          capture_output=True, text=True)  # fmt: skip
    verdict = json.loads(diff.stdout)["verdict"]
    assert not verdict["hot"] and "firmware resource zImage changed (blake2b differs)" in verdict["reasons"]


def test_with_resources_folds_reasons_into_a_verdict() -> None:
    hot = Verdict(True, (), ())
    assert with_resources(hot, {"rootfs.img": (1, "a"), "zImage": (2, "b")}, {"rootfs.img": (9, "z"), "zImage": (2, "b")}) is hot
    changed = with_resources(hot, {"zImage": (2, "b")}, {"zImage": (2, "c")})
    assert not changed.hot and changed.reasons == ("firmware resource zImage changed (blake2b differs)",)
    unknown = with_resources(hot, None, {"rootfs.img": (1, "a"), "boot.scr": (3, "d")})
    assert not unknown.hot and "boot.scr cannot be compared" in unknown.reasons[0]
    assert with_resources(hot, None, {"rootfs.img": (1, "a")}) is hot  # only the rootfs: the manifest decides
    reboot = Verdict(False, ("/etc changed",), ())
    assert with_resources(reboot, {}, {"zImage": (1, "x")}).reasons == ("/etc changed", "firmware resource zImage added")


@pytest.mark.parametrize(
    "spec, expected",
    [("sshfwup.pipeline:run", "sshfwup.update.pipeline"), ("sshfwup.update:report_only", "sshfwup.update.update")],
)
def test_callbacks_named_before_the_modules_moved_still_load(spec: str, expected: str) -> None:
    """A configuration written before the package layout (issue 21) names the old modules."""
    from sshfwup.update.update import load_callback

    fn = load_callback(spec)
    assert fn.__module__ == expected and fn.__name__ == spec.rpartition(":")[2]
