"""The QEMU device's faults (full tier, ``--run-vm``): ``revert`` and ``validate`` across real
reboots and after a hot swap; a firmware whose init fails; power cuts (QEMU SIGKILL) at seeded
random points of an upload, a hot swap, fwup's last writes and env write, and a trial boot's
validation (``--vm-cuts N``, default 10; the seed printed, ``SSHFWUP_VM_SEED`` replays it); and a
blank U-Boot environment area on real U-Boot. One VM for the module, tests in order.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal
from vmkit import (  # type: ignore[import-not-found]
    CutUpload,
    Device,
    Fw,
    app_version,
    booted_device,
    build_firmware,
    reboot,
    settled,
    upload,
    wait_rebooted,
)

from sshfwup.vm.image import VmDir

pytestmark = pytest.mark.vm

# family "plain" (no release file: the factory's /etc) and family "rel" (/etc changed): an update
# inside a family changes only the app (hot), across families it needs a reboot. Versions only go
# up (sshfwup refuses a downgrade): each cut takes the lowest one above the running firmware.
FAMILY = {"1.0.0": "plain", "1.0.1": "plain", "1.0.2": "plain", "1.1.0": "rel", "1.1.1": "rel",
          "1.2.0": "plain", "1.2.1": "plain", "1.4.0": "rel", "1.4.1": "rel", "1.5.0": "plain", "1.6.0": "rel"}  # fmt: skip


def _build(vm: VmDir, version: str, *, broken_init: bool = False) -> Fw:
    return build_firmware(vm, version, release=None if FAMILY.get(version) == "plain" else "rel",
                          broken_init=broken_init)  # fmt: skip


@pytest.fixture(scope="module")
def fws(vm_dir: Path) -> Iterator[dict[str, Future[Fw]]]:
    """Built one after another on a second core while the first tests run."""
    vm = VmDir(vm_dir)
    pool = ThreadPoolExecutor(1)
    try:
        out = {v: pool.submit(_build, vm, v) for v in ("1.0.1", "1.1.0")}
        out["broken"] = pool.submit(_build, vm, "1.3.0", broken_init=True)
        out.update({v: pool.submit(_build, vm, v) for v in sorted(FAMILY, key=_key)[2:] if v != "1.1.0"})
        yield out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed test does not wait for unused builds


@pytest.fixture(scope="module")
def device(vm_dir: Path, fws: Any, portal: BlockingPortal) -> Iterator[Device]:
    with booted_device(portal, vm_dir) as device:
        yield device


def test_validate_is_refused_after_a_hot_swap_and_revert_swaps_back(device: Device, fws: dict[str, Future[Fw]]) -> None:
    settled(device, "1.0.0")
    upload(device, fws["1.0.1"].result(timeout=900))
    s = device.wait_status(lambda s: app_version(s) == "1.0.1", timeout=120, what="1.0.1 swapped in")
    assert s["pending_reboot"] and s["active"] == "b" and s["running_root"] == "a", s
    refused = device.ssh("validate")
    assert refused.returncode != 0 and "reboot first" in refused.stderr + refused.stdout, refused
    reverted = device.ssh("revert")
    assert reverted.returncode == 0 and "no reboot needed" in reverted.stdout + reverted.stderr, reverted
    s = settled(device, "1.0.0", timeout=120)
    assert '"1.0.0"' in device.get("/")[1]
    env = device.env()
    assert (env["nerves_fw_active"], env["nerves_fw_validated"]) == ("a", "1"), env
    wait_rebooted(device, reboot(device))  # the revert holds across a real reboot
    s = settled(device, "1.0.0")
    assert s["running_root"] == "a", s


def test_revert_across_a_reboot_boots_a_trial_and_validate_validates_it(device: Device, fws: dict[str, Future[Fw]]) -> None:
    upload(device, fws["1.1.0"].result(timeout=900))
    s = settled(device, "1.1.0")
    assert s["running_root"] == "b", s
    reverted = device.ssh("revert")
    assert reverted.returncode == 0, reverted
    s = device.status()
    assert s["active"] == "a" and s["running_root"] == "b" and s["pending_reboot"], s
    print(f"after revert from a validated 1.1.0: status {s['active']=} {s['validated']=} {s['trial_boot']=}; env {device.env()}")
    wait_rebooted(device, reboot(device))
    s = device.wait_status(lambda s: app_version(s) == "1.0.0", what="1.0.0 running after the revert's reboot")
    assert s["running_root"] == "a", s
    validated = device.ssh("validate")
    text = validated.stdout + validated.stderr
    assert validated.returncode == 0 and ("validated firmware 1.0.0" in text or "already validated" in text), text
    s = settled(device, "1.0.0", timeout=60)
    env = device.env()
    assert (env["nerves_fw_active"], env["nerves_fw_validated"], env["upgrade_available"]) == ("a", "1", "0"), env


def test_a_firmware_whose_init_fails_falls_back_after_bootlimit_tries(device: Device, fws: dict[str, Future[Fw]]) -> None:
    """/sbin/init exits at once: kernel panic, panic=5 resets; U-Boot counts the tries and after
    bootlimit boots the old slot; sshfwup then says what happened."""
    broken = fws["broken"].result(timeout=900)
    t = time.monotonic()
    upload(device, broken)
    wait_rebooted(device, t, timeout=600)  # through bootlimit failed tries (~15 s each)
    s = settled(device, "1.0.0")
    env = device.env()
    assert (s["running_root"], env["nerves_fw_active"], env["upgrade_available"], env["bootcount"]) == ("a", "a", "0", "0")
    console = device.running.console.read_bytes().decode(errors="replace")
    assert "this init fails on purpose" in console and "did not validate within 3 boots, falling back" in console
    print(f"status after the init-failure fallback:\n{device.status_text()}")


def test_status_says_the_device_fell_back_and_from_what(device: Device) -> None:
    s = device.status()
    text = device.status_text()
    last = s.get("last_update") or {}
    assert not last.get("ok") and "1.3.0" in str(last.get("verdict")), f"status does not say it fell back from 1.3.0:\n{text}"
    assert s["slots"]["b"].get("state") or "fell back" in text, text


@dataclass(frozen=True)
class Cut:
    phase: str  # upload | swap | finish | validation
    fraction: float  # where in the phase


def _check_truth(device: Device, where: str) -> dict[str, Any]:
    """After a power cut: a complete firmware runs and status says exactly what runs."""
    s = device.wait_status(lambda s: (s.get("app") or {}).get("state") == "running" and not s["update_in_progress"],
                           timeout=400, what=f"{where}: the app running again")  # fmt: skip
    # a trial boot (the cut hit after fwup's env switch) validates on its own or falls back
    if not s["validated"] or s["active"] != s["running_root"]:
        s = settled(device, timeout=400)
    text = device.status_text()
    app = s["app"]
    root = device.sh("findmnt -n -o SOURCE /").stdout.strip()
    assert root == {"a": "/dev/vda2", "b": "/dev/vda3"}[s["running_root"]], f"{where}: / is {root}\n{text}"
    served = device.get("/", timeout=10)[1]
    assert f'"{app["version"]}"' in served, f"{where}: the app serves {served!r}, status says {app['version']}\n{text}"
    assert s["slots"][app["slot"]]["version"] == app["version"], f"{where}\n{text}"
    env = device.env()
    assert env["nerves_fw_active"] == s["active"] and (env["nerves_fw_validated"] == "1") == s["validated"], f"{where}: {env}\n{text}"
    return s


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _pick_target(s: dict[str, Any], fws: dict[str, Future[Fw]], *, hot: bool) -> Fw:
    """The lowest version above the running one, of its family (hot) or the other (reboot);
    any higher one when the family has none left."""
    running = app_version(s) or "1.0.0"
    family = FAMILY.get(running, "rel")
    higher = [v for v in sorted(FAMILY, key=_key) if _key(v) > _key(running)]
    if not higher:
        raise AssertionError(f"no firmware above {running} left: raise FAMILY's versions for more cuts")
    choices = [v for v in higher if (FAMILY[v] == family) == hot] or higher
    return fws[choices[0]].result(timeout=900)


def test_power_cuts_at_random_points_each_boot_a_complete_firmware(
    device: Device, fws: dict[str, Future[Fw]], vm_seed: int, request: pytest.FixtureRequest
) -> None:
    count = int(request.config.getoption("--vm-cuts"))
    rng = random.Random(vm_seed)
    cuts = [Cut(rng.choice(("upload", "swap", "finish", "validation")), rng.random()) for _ in range(count)]
    print(f"seed {vm_seed}: {count} power cuts: {[(c.phase, round(c.fraction, 2)) for c in cuts]}")
    for n, cut in enumerate(cuts, 1):
        s = settled(device)
        where = f"seed {vm_seed}, cut {n}/{count} ({cut.phase} at {cut.fraction:.2f})"
        fw = _pick_target(s, fws, hot=cut.phase == "swap")
        where += f", {app_version(s)} → {fw.version}"
        print(where)
        size = fw.path.stat().st_size
        if cut.phase == "upload":
            proc = CutUpload(device, fw.path, int(size * (0.02 + 0.93 * cut.fraction))).run()
            try:
                device.power_cut()
            finally:
                proc.kill()
                proc.wait(10)
        else:
            # every byte sent, then the cut: within fwup's last seconds (its last writes and
            # the env switch: the device is a few MB behind what was sent), during the hot swap
            # (up to 60 s after the last byte), or in the trial boot (up to 70 s after the verdict)
            proc = CutUpload(device, fw.path, size).run()
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                if cut.phase == "validation":
                    assert proc.stdout is not None
                    out = proc.stdout.read().decode(errors="replace")  # until the verdict and EOF
                    assert proc.wait(60) == 0, f"{where}: the upload failed:\n{out}"
                    time.sleep(cut.fraction * 70)
                else:
                    try:
                        proc.wait(cut.fraction * (4 if cut.phase == "finish" else 60))
                    except subprocess.TimeoutExpired:
                        pass
                device.power_cut()
            finally:
                proc.kill()
                proc.wait(10)
        _check_truth(device, where)
    final = _pick_target(settled(device), fws, hot=False)
    upload(device, final)
    settled(device, final.version)


def test_a_blank_env_area_boots_slot_a_and_stays_blank(device: Device) -> None:
    """On real U-Boot: the disk's env area zeroed, the boot script imports nothing, boots slot a and
    writes nothing; then sshfwup's status says what it sees. The env is put back afterwards."""
    s = settled(device)
    backup = "/data/env-area.bak"
    assert device.sh(f"dd if=/dev/vda of={backup} bs=512 skip=2048 count=256 status=none && sync").status == 0
    assert device.sh("dd if=/dev/zero of=/dev/vda bs=512 seek=2048 count=256 conv=fsync status=none").status == 0
    device.power_cut()
    console = device.running.console.read_bytes().decode(errors="replace")
    assert "no valid environment at block 0x800" in console.rsplit("U-Boot 20", 1)[-1], console[-3000:]
    nonzero = device.sh("dd if=/dev/vda bs=512 skip=2048 count=256 status=none | tr -d '\\000' | wc -c").stdout.strip()
    assert nonzero == "0", f"the env area was written: {nonzero} non-zero bytes"
    assert device.sh("findmnt -n -o SOURCE /").stdout.strip() == "/dev/vda2"
    text = device.status_text()
    print(f"status with a blank env area (was slot {s['running_root']}):\n{text}")
    assert "boot env" in text and "unreadable" in text, text
    assert device.sh(f"dd if={backup} of=/dev/vda bs=512 seek=2048 count=256 conv=fsync status=none").status == 0
