"""sshfwup on a real boot: U-Boot → boot.scr → Debian kernel → systemd → sshfwup.service.

One VM for the module, tests in order: it boots and answers, runs under systemd as shipped, the
app sits in its own cgroup, a reboot-required update really reboots into the other slot and
validates, and a hot update swaps the app with no failed request under load.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal

from vmkit import Device, Load, reboot, wait_rebooted  # type: ignore[import-not-found]

from sshfwup.vm.agent import wait_agent
from sshfwup.vm.image import VmDir, firmware
from sshfwup.vm.machine import VmOptions, power_cut, run_vm

pytestmark = pytest.mark.vm

FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def firmwares(vm_dir: Path) -> dict[str, Path]:
    """1.1.0: a change outside the app (reboot); 1.2.0: then only the app's VERSION (hot)."""
    vm = VmDir(vm_dir)
    release = vm.staging / "etc/sshfwup-vm-release"
    release.write_text("1.1.0\n")
    reboot = firmware(vm, "1.1.0")
    assert reboot.hot is True  # the marker allows hot; the manifest decides: /etc changed → reboot
    hot = firmware(vm, "1.2.0")
    return {"reboot": reboot.path, "hot": hot.path}


@pytest.fixture(scope="module")
def device(vm_dir: Path, portal: BlockingPortal) -> Iterator[Device]:
    t0 = time.monotonic()
    cm = run_vm(VmDir(vm_dir), VmOptions(boot_timeout=300))
    with portal.wrap_async_context_manager(cm) as running:
        FIGURES["power-on → SSH banner (s)"] = time.monotonic() - t0
        portal.call(lambda: wait_agent(running.agent, time.monotonic() + 120))
        yield Device(portal, running)
    print("\nvm figures:", {k: round(v, 1) for k, v in FIGURES.items()})


def test_boots_and_status_answers(device: Device) -> None:
    result = device.ssh("status")
    assert result.returncode == 0, result.stderr
    assert "1.0.0" in result.stdout, result.stdout
    up = device.sh("cut -d' ' -f1 /proc/uptime")
    ready = device.sh("systemctl show -p ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic sshfwup")
    values = dict(line.split("=", 1) for line in ready.stdout.split())
    FIGURES["kernel start → READY=1 (s)"] = int(values["ActiveEnterTimestampMonotonic"]) / 1e6
    assert float(up.stdout) > 0


def test_sshfwup_runs_under_systemd_as_shipped(device: Device) -> None:
    show = device.sh("systemctl show -p ActiveState,SubState,Type,NotifyAccess,ExecStart,Delegate sshfwup")
    props = dict(line.split("=", 1) for line in show.stdout.splitlines() if "=" in line)
    assert props["ActiveState"] == "active" and props["SubState"] == "running", show.stdout
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
    assert "/usr/bin/sshfwup" in props["ExecStart"] and props["Delegate"] == "yes"
    unit = device.sh("cmp /lib/systemd/system/sshfwup.service /lib/systemd/system/sshfwup.service && "
                     "readlink -f /usr/bin/sshfwup")  # fmt: skip
    assert unit.stdout.strip() == "/opt/sshfwup/bin/sshfwup"


def test_app_runs_as_its_user_in_its_own_cgroup(device: Device) -> None:
    pid = device.sh("pgrep -u sshfwup-app -f app.py | head -n1").stdout.strip()
    assert pid, device.sh("ps -eo user,pid,cgroup,cmd").stdout
    cgroup = device.sh(f"cat /proc/{pid}/cgroup").stdout.strip()
    path = cgroup.split("::", 1)[1]
    assert path.startswith("/system.slice/sshfwup.service/") and path != "/system.slice/sshfwup.service/", cgroup
    status, body = device.get("/")
    assert status == 200 and '"1.0.0"' in body


def test_reboot_update_boots_the_other_slot_and_validates(device: Device, firmwares: dict[str, Path]) -> None:
    t0 = time.monotonic()
    result = device.ssh("fwup", stdin=firmwares["reboot"])
    FIGURES["upload+apply 1.1.0 (s)"] = time.monotonic() - t0
    assert result.returncode == 0, result.stdout + result.stderr
    t1 = time.monotonic()
    deadline = t1 + 300
    wait_rebooted(device, t1)
    while time.monotonic() < deadline:
        status = device.ssh("status", timeout=30)
        if status.returncode == 0 and "1.1.0" in status.stdout:
            break
        time.sleep(2)
    FIGURES["reboot round trip: verdict → SSH answers again (s)"] = time.monotonic() - t1
    env = ""
    while time.monotonic() < deadline:
        env = device.sh("fw_printenv nerves_fw_active nerves_fw_validated upgrade_available bootcount").stdout
        if "nerves_fw_validated=1" in env:
            break
        time.sleep(2)
    FIGURES["verdict → validated (s)"] = time.monotonic() - t1
    assert "nerves_fw_active=b" in env and "nerves_fw_validated=1" in env and "upgrade_available=0" in env, env
    assert device.sh("grep -c ' / squashfs' /proc/mounts; grep '^/dev/vda3 / ' /proc/mounts").status == 0


def test_hot_update_under_load_fails_no_request(device: Device, firmwares: dict[str, Path]) -> None:
    with Load(device) as load:
        time.sleep(2)
        t0 = time.monotonic()
        result = device.ssh("fwup", stdin=firmwares["hot"])
        FIGURES["hot update 1.2.0: upload → verdict (s)"] = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "1.2.0" not in device.get("/")[1]:
            time.sleep(0.5)
        time.sleep(2)
    FIGURES["hot update: requests served during it"] = load.ok
    assert result.returncode == 0, result.stdout + result.stderr
    assert load.failed == [], load.failed[:5]
    assert "1.2.0" in device.get("/")[1]
    assert {"1.1.0", "1.2.0"} <= load.versions, load.versions


def test_unvalidated_firmware_falls_back_after_bootlimit_boots(device: Device, vm_dir: Path) -> None:
    """boot.scr's contract: a firmware that never validates (here: sshfwup cannot start, its
    config is broken) is booted bootlimit times, then the other slot is active and validated."""
    vm = VmDir(vm_dir)
    wait_rebooted(device, reboot(device))  # run 1.2.0 from its own slot (a), no hot swap pending
    assert device.env()["nerves_fw_active"] == "a"
    config = vm.staging / "etc/sshfwup.toml"
    good = config.read_text()
    config.write_text("this is [not toml\n")
    try:
        broken = firmware(vm, "1.3.0").path
    finally:
        config.write_text(good)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and device.ssh("status", timeout=30).returncode != 0:
        time.sleep(2)  # sshfwup up again after the reboot
    t = time.monotonic()
    result = device.ssh("fwup", stdin=broken)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_rebooted(device, t)  # sshfwup reboots into b: trial boot 1
    seen = [device.env()]
    limit = int(seen[0]["bootlimit"])
    for _ in range(limit):
        wait_rebooted(device, reboot(device))
        seen.append(device.env())
    counts = [(e["nerves_fw_active"], e["bootcount"], e["upgrade_available"]) for e in seen]
    assert counts[:limit] == [("b", str(n), "1") for n in range(1, limit + 1)], counts
    assert seen[-1]["nerves_fw_active"] == "a" and seen[-1]["nerves_fw_validated"] == "1", seen[-1]
    assert seen[-1]["upgrade_available"] == "0" and seen[-1]["bootcount"] == "0", seen[-1]
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        status = device.ssh("status", timeout=30)
        if status.returncode == 0 and "1.2.0" in status.stdout:
            break
        time.sleep(2)
    assert "1.2.0" in device.get("/")[1]


def test_power_cut_during_an_update_boots_the_old_firmware_and_the_update_retries(device: Device, vm_dir: Path) -> None:
    """Power cut while fwup writes the other slot: the running firmware boots again, validated,
    and the same upload then succeeds."""
    vm = VmDir(vm_dir)
    (vm.staging / "etc/sshfwup-vm-release").write_text("1.4.0\n")
    new = firmware(vm, "1.4.0").path
    before = device.env()
    running = before["nerves_fw_active"]
    argv = device.running.ssh_argv("fwup")
    argv.insert(-2, "-s")
    with new.open("rb") as f:
        upload = subprocess.Popen(argv, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            time.sleep(10)  # about a third of the 180 MB
            assert upload.poll() is None, "the upload ended before the power cut"
            t = time.monotonic()
            device.portal.call(lambda: power_cut(device.running))
        finally:
            upload.kill()
            upload.wait(10)
    wait_rebooted(device, t)
    after = device.env()
    assert after["nerves_fw_active"] == running and after["nerves_fw_validated"] == "1", after
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and device.ssh("status", timeout=30).returncode != 0:
        time.sleep(2)
    t = time.monotonic()
    result = device.ssh("fwup", stdin=new)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_rebooted(device, t)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        if "nerves_fw_validated=1" in device.sh("fw_printenv nerves_fw_validated").stdout:
            break
        time.sleep(2)
    final = device.env()
    assert final["nerves_fw_active"] != running and final["nerves_fw_validated"] == "1", final
    assert '"1.4.0"' in device.get("/")[1]
