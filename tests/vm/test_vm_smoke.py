"""The QEMU device's CI smoke, in the default run (marker ``vm_smoke``; the full tier is ``--run-vm``).

One cold boot of a freshly built VM (the rootfs from /var/cache/sshfwup-vm when cached), then in
order: ``status`` answers; the power is cut (QEMU SIGKILL) at a seeded random point of an upload of
a reboot-needing firmware, the next boot lands in the complete old firmware and ``status`` says
so; the same upload then works, reboots into the other slot and validates; a hot update under
light HTTP load fails no request. The seed is printed (``SSHFWUP_VM_SEED`` replays it).

Needs root (mmdebstrap, chroot): skipped with the reason otherwise. A missing tool fails the smoke
with the one message naming the packages (CI installs them with scripts/bootstrap.sh: a skip would
hide a broken install). With ``--run-vm`` the full tier runs instead, which has every step.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal

from vmkit import CutUpload, Device, Load, app_version, build_vm_dir, missing_tools  # type: ignore[import-not-found]

pytestmark = pytest.mark.vm_smoke

FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def smoke_vm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    if request.config.getoption("--run-vm"):
        pytest.skip("--run-vm: the full vm tier runs every step of the smoke (tests/vm/test_vm_device.py)")
    if os.geteuid() != 0:
        pytest.skip("the QEMU device smoke needs root (mmdebstrap, chroot): run ./scripts/test.sh as root")

    reason = missing_tools()
    if reason:
        pytest.fail(reason, pytrace=False)
    path, kept, took = build_vm_dir(tmp_path_factory)
    FIGURES["build (s)"] = took
    yield path
    if not kept:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def firmwares(smoke_vm: Path) -> Iterator[dict[str, Future[Path]]]:
    """Built on a second core while the VM boots: 1.1.0 changes /etc (a reboot update), 1.2.0
    then only the app (a hot update)."""
    from sshfwup.vm.image import VmDir, firmware

    vm = VmDir(smoke_vm)

    def build(version: str) -> Path:
        (vm.staging / "etc/sshfwup-vm-release").write_text("1.1.0\n")
        return firmware(vm, version).path

    pool = ThreadPoolExecutor(1)
    try:
        yield {v: pool.submit(build, v) for v in ("1.1.0", "1.2.0")}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a failed test does not wait for unused builds


@pytest.fixture(scope="module")
def device(smoke_vm: Path, firmwares: Any, portal: BlockingPortal) -> Iterator[Device]:
    from sshfwup.vm.agent import wait_agent
    from sshfwup.vm.image import VmDir
    from sshfwup.vm.machine import VmOptions, run_vm

    t0 = time.monotonic()
    with portal.wrap_async_context_manager(run_vm(VmDir(smoke_vm), VmOptions(boot_timeout=300))) as running:
        FIGURES["cold boot: power-on → SSH (s)"] = time.monotonic() - t0
        portal.call(lambda: wait_agent(running.agent, time.monotonic() + 120))
        yield Device(portal, running)
    print("\nvm smoke figures:", {k: round(v, 1) for k, v in FIGURES.items()})


def test_cold_boot_status_answers(device: Device) -> None:
    s = device.wait_status(lambda s: app_version(s) == "1.0.0", timeout=120, what="app 1.0.0 running")
    assert (s["running_root"], s["active"], s["validated"]) == ("a", "a", True), s
    assert s["slots"]["a"]["version"] == "1.0.0", s


def test_power_cut_during_an_upload_boots_the_old_firmware_and_the_upload_then_works(
    device: Device, firmwares: dict[str, Future[Path]], vm_seed: int
) -> None:
    fw = firmwares["1.1.0"].result(timeout=600)
    rng = random.Random(vm_seed)
    size = fw.stat().st_size
    # a point inside the upload: past fwup's first writes, before its last (the bytes in flight in
    # the SSH channel and the port forward keep the device a few MB behind what was sent)
    cut_at = int(size * rng.uniform(0.05, 0.9))
    where = f"seed {vm_seed}: power cut after {cut_at} of {size} bytes of 1.1.0 sent"
    print(where)
    upload = CutUpload(device, fw, cut_at)
    proc = upload.run()
    try:
        assert proc.poll() is None, f"{where}: the upload ended before the cut: {proc.stdout.read() if proc.stdout else ''}"
        t = time.monotonic()
        FIGURES["power cut → SSH (s)"] = device.power_cut()
    finally:
        proc.kill()
        proc.wait(10)
    s = device.wait_status(lambda s: app_version(s) is not None and s["app"]["state"] == "running",
                           timeout=180, what="the app running after the power cut")  # fmt: skip
    text = device.status_text()
    env = device.env()
    print(f"{where}\nstatus after the cut:\n{text}\nenv: {env}")
    assert (s["running_root"], s["active"], s["validated"]) == ("a", "a", True), f"{where}\n{text}"
    assert app_version(s) == "1.0.0" and s["slots"]["a"]["version"] == "1.0.0", f"{where}\n{text}"
    assert s["slots"]["b"]["version"] != "1.1.0", f"{where}: slot b claims the firmware whose upload was cut\n{text}"
    assert not s["update_in_progress"] and s["update"] is None, f"{where}\n{text}"
    assert env.get("upgrade_available") == "0" and env.get("nerves_fw_active") == "a", f"{where}: {env}"
    FIGURES["power cut → app running again (s)"] = time.monotonic() - t

    t = time.monotonic()
    result = device.ssh("fwup", stdin=fw)
    FIGURES["reboot update: upload+apply (s)"] = time.monotonic() - t
    assert result.returncode == 0, f"{where}: the upload after the power cut failed:\n{result.stdout}{result.stderr}"
    s = device.wait_status(lambda s: s["running_root"] == "b" and s["validated"] and app_version(s) == "1.1.0",
                           timeout=400, what="1.1.0 booted from slot b and validated")  # fmt: skip
    FIGURES["reboot update: verdict → validated (s)"] = time.monotonic() - t - FIGURES["reboot update: upload+apply (s)"]
    assert s["active"] == "b" and s["slots"]["b"]["version"] == "1.1.0", s
    env = device.env()
    assert env.get("upgrade_available") == "0" and env.get("bootcount") == "0", env


def test_hot_update_under_light_load_fails_no_request(device: Device, firmwares: dict[str, Future[Path]]) -> None:
    fw = firmwares["1.2.0"].result(timeout=600)
    with Load(device, pause=0.05) as load:
        time.sleep(1)
        t = time.monotonic()
        result = device.ssh("fwup", stdin=fw)
        FIGURES["hot update: upload → verdict (s)"] = time.monotonic() - t
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and '"1.2.0"' not in device.get("/", timeout=10)[1]:
            time.sleep(0.5)
        time.sleep(1)
    FIGURES["hot update: requests served"] = load.ok
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == [], load.failed[:5]
    assert {"1.1.0", "1.2.0"} <= load.versions, load.versions
    s = device.status()
    assert app_version(s) == "1.2.0" and s["running_root"] == "b", s
    assert s["last_update"] and s["last_update"].get("ok"), s["last_update"]
