"""The boot contracts besides the default on the real QEMU device (full tier, ``--run-vm``): a VM
built with ``sshfwup vm build --contract uboot-nerves`` and one with ``--contract fwup-ops`` (both:
U-Boot runs deploy/uboot/nerves/boot.cmd unchanged; under fwup-ops every boot-state change is a task
of the device's ops archive, deploy/vm/ops.conf). For each, on one VM, tests in order:

- a cold boot: ``status`` names the contract, slot a, validated;
- a hot update, then ``revert`` (a proven revert: the running slot boots next, no reboot), which
  holds across a real reboot;
- a reboot update boots the new slot on trial and sshfwup validates it after the observation window;
- ``revert`` of that validated firmware: the old slot, not proven on this boot, boots on trial
  after a real reboot and sshfwup validates it;
- a firmware whose init fails: U-Boot gives it its one trial boot, then boots the old slot, and
  ``status`` says it fell back.

The Pi's tryboot cannot run under QEMU (no Pi firmware): the simulator proves that variant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal
from vmkit import (  # type: ignore[import-not-found]
    Device,
    Fw,
    app_version,
    booted_device,
    build_firmware,
    console_since,
    reboot,
    settled,
    upload,
    wait_rebooted,
)

from sshfwup.vm.image import VmDir

pytestmark = pytest.mark.vm

REBOOT_PARAM = "/run/systemd/reboot-param"  # the fwup-ops device's [boot] reboot_param_path


@pytest.fixture(scope="module")
def contract(contract_vm_dir: Path) -> str:
    return VmDir(contract_vm_dir).contract.name


@pytest.fixture(scope="module")
def fws(contract_vm_dir: Path) -> Iterator[dict[str, Future[Fw]]]:
    """1.0.1: only the app changes (hot); 1.1.0: /etc changes (reboot); 1.2.0: /sbin/init exits.
    Built one after another on the second core while the first tests run."""
    vm = VmDir(contract_vm_dir)
    pool = ThreadPoolExecutor(1)
    try:
        yield {
            "hot": pool.submit(build_firmware, vm, "1.0.1", release=None),
            "reboot": pool.submit(build_firmware, vm, "1.1.0", release="rel"),
            "broken": pool.submit(build_firmware, vm, "1.2.0", release="rel", broken_init=True),
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def device(contract_vm_dir: Path, fws: Any, portal: BlockingPortal) -> Iterator[Device]:
    with booted_device(portal, contract_vm_dir) as device:
        yield device


def boot_vars(device: Device) -> tuple[str, str, str]:
    """(nerves_fw_active, nerves_fw_validated, nerves_fw_booted) in the disk's U-Boot env."""
    env = device.env()
    return env.get("nerves_fw_active", "?"), env.get("nerves_fw_validated", "?"), env.get("nerves_fw_booted", "?")


def reboot_param(device: Device) -> str:
    return device.sh(f"cat {REBOOT_PARAM} 2>/dev/null").stdout.strip()


def console_size(device: Device) -> int:
    return device.running.console.stat().st_size


def test_cold_boot_status_names_the_contract_slot_a_validated(device: Device, contract: str) -> None:
    s = settled(device, "1.0.0")
    assert (s["boot_contract"], s["running_root"], s["active"], s["validated"], s["trial_boot"]) == (
        contract, "a", "a", True, False), s  # fmt: skip
    assert not s["boot_warnings"], s["boot_warnings"]  # nerves_fw_autovalidate=0: sshfwup validates
    env = device.env()
    assert env.get("nerves_fw_autovalidate") == "0" and boot_vars(device) == ("a", "1", "1"), env
    assert "sshfwup: booting slot a" in device.running.console.read_bytes().decode(errors="replace")
    if contract == "fwup-ops":
        ops = device.sh("/usr/local/bin/fwup -a -q -U -i /usr/share/fwup/ops.fw -t status -d /dev/vda")
        assert ops.status == 0 and "a" in ops.stdout.split(), ops


def test_a_proven_revert_after_a_hot_update_holds_across_a_reboot(
    device: Device, contract: str, fws: dict[str, Future[Fw]]
) -> None:
    upload(device, fws["hot"].result(timeout=900))
    s = device.wait_status(lambda s: app_version(s) == "1.0.1", timeout=180, what="1.0.1 swapped in")
    assert (s["active"], s["running_root"], s["pending_reboot"], s["trial_boot"]) == ("b", "a", True, True), s
    assert boot_vars(device) == ("b", "0", "0")  # b's first boot, on trial, is next
    if contract == "fwup-ops":
        assert reboot_param(device) == "0 tryboot"
    reverted = device.ssh("revert")
    assert reverted.returncode == 0 and "no reboot needed" in reverted.stdout + reverted.stderr, reverted
    settled(device, "1.0.0", timeout=120)
    assert boot_vars(device)[:2] == ("a", "1")
    if contract == "fwup-ops":
        assert reboot_param(device) == "0"  # validate.a: an ordinary restart next
    _reboot_into_validated_slot_a(device)


def test_a_reboot_update_boots_the_new_slot_on_trial_and_sshfwup_validates_it(
    device: Device, fws: dict[str, Future[Fw]]
) -> None:
    mark = console_size(device)
    t = time.monotonic()
    upload(device, fws["reboot"].result(timeout=900))
    wait_rebooted(device, t)
    s = settled(device, "1.1.0")
    assert (s["running_root"], s["active"]) == ("b", "b") and boot_vars(device) == ("b", "1", "1"), s
    # sshfwup's verdict is set just after its env write: a status in between may still lack it
    device.wait_status(lambda s: "validated after a healthy boot" in str((s.get("last_update") or {}).get("verdict")),
                       timeout=60, what="sshfwup's own validation as the last update's verdict")  # fmt: skip
    assert "sshfwup: booting slot b" in console_since(device, mark)


def test_a_revert_to_the_unproven_old_slot_boots_it_on_trial_and_it_validates(device: Device, contract: str) -> None:
    reverted = device.ssh("revert")
    text = reverted.stdout + reverted.stderr
    assert reverted.returncode == 0 and "boots next, unvalidated" in text, text
    s = device.status()
    assert (s["active"], s["running_root"], s["pending_reboot"], s["trial_boot"]) == ("a", "b", True, True), s
    assert boot_vars(device) == ("a", "0", "0")  # a first boot again: one trial, then U-Boot falls back
    if contract == "fwup-ops":
        assert reboot_param(device) == "0 tryboot"
    _reboot_into_validated_slot_a(device)


def test_a_firmware_whose_init_fails_gets_one_trial_boot_then_u_boot_falls_back(
    device: Device, fws: dict[str, Future[Fw]]
) -> None:
    broken = fws["broken"].result(timeout=900)
    mark = console_size(device)
    t = time.monotonic()
    upload(device, broken)
    wait_rebooted(device, t, timeout=600)  # the trial boot (kernel panic, panic=5 resets), then slot a
    s = settled(device, "1.0.0")
    assert s["running_root"] == "a" and boot_vars(device)[:2] == ("a", "1"), s
    console = console_since(device, mark)
    assert "this init fails on purpose" in console and "sshfwup: slot b never validated, reverting to slot a" in console
    assert console.count("sshfwup: booting slot b") == 1, "U-Boot gave the broken firmware more than one trial boot"
    last = s.get("last_update") or {}
    text = device.status_text()
    assert not last.get("ok") and "fell back" in str(last.get("verdict")) and "1.2.0" in str(last.get("verdict")), text
    print(f"status after the init-failure fallback:\n{text}")


def _reboot_into_validated_slot_a(device: Device) -> None:
    """A real reboot: U-Boot boots slot a (it says so on the console), 1.0.0 runs there validated."""
    mark = console_size(device)
    wait_rebooted(device, reboot(device))
    s = settled(device, "1.0.0")
    assert s["running_root"] == "a" and boot_vars(device) == ("a", "1", "1"), s
    assert "sshfwup: booting slot a" in console_since(device, mark)
