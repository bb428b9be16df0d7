"""The tests' hands on a running QEMU device: a root shell through the guest agent, OpenSSH to
sshfwup, HTTP to the app, a load generator, and waits for reboots (the smoke and the full tier)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from anyio.from_thread import BlockingPortal

from sshfwup.vm.agent import Exec, guest_exec, wait_agent
from sshfwup.vm.image import VmDir
from sshfwup.vm.machine import Running, VmOptions, kill_power, run_vm, wait_booted

@contextmanager
def booted_device(portal: BlockingPortal, vm_dir: Path, *, boot_timeout: float = 300) -> Iterator[Device]:
    """The VM of ``vm_dir`` powered on, SSH and the guest agent answering; powered off after."""
    with portal.wrap_async_context_manager(run_vm(VmDir(vm_dir), VmOptions(boot_timeout=boot_timeout))) as running:
        portal.call(lambda: wait_agent(running.agent, time.monotonic() + 120))
        yield Device(portal, running)


def missing_tools() -> str | None:
    """The one message naming every missing tool, or None."""
    from sshfwup.vm.errors import ToolMissing
    from sshfwup.vm.tools import BUILD_TOOLS, RUN_TOOLS, require, uboot_rom

    try:
        require({**BUILD_TOOLS, **RUN_TOOLS}, what="the QEMU device tests")
        uboot_rom()
    except ToolMissing as e:
        return str(e)
    return None


def build_vm_dir(tmp_path_factory: pytest.TempPathFactory, contract: str = "uboot-bootcount") -> tuple[Path, bool, float]:
    """(a VM directory built for ``contract``, whether it is a kept one, seconds the build took).
    ``SSHFWUP_VM_DIR`` keeps the default contract's; another contract's is kept beside it
    (``$SSHFWUP_VM_DIR-<contract>``), rebuilt when it was built for another contract."""
    from sshfwup.vm.image import VmDir, build_vm

    keep = os.environ.get("SSHFWUP_VM_DIR")
    if keep and contract != "uboot-bootcount":
        keep = f"{keep.rstrip('/')}-{contract}"
    path = Path(keep) if keep else tmp_path_factory.mktemp(f"vm-{contract}")
    vm = VmDir(path.resolve())
    t0 = time.monotonic()
    if not (keep and vm.disk.is_file() and vm.contract.name == contract):
        build_vm(vm.path, contract=contract)
    return vm.path, bool(keep), time.monotonic() - t0


# A change outside /srv/app (a reboot update) or back: the release file in /etc.
RELEASE = "etc/sshfwup-vm-release"


@dataclass(frozen=True)
class Fw:
    version: str
    path: Path


def build_firmware(vm: VmDir, version: str, *, release: str | None, broken_init: bool = False) -> Fw:
    """``version`` from the VM's staging tree with /etc/sshfwup-vm-release holding ``release``
    (None: no such file, as the factory's), and with ``broken_init`` an /sbin/init that exits at
    once (the kernel panics, panic=5 resets the machine); the tree is put back afterwards."""
    from sshfwup.vm.image import firmware

    path = vm.staging / RELEASE
    init = vm.staging / "sbin/init"
    if release is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(release + "\n")
    saved = init.readlink() if init.is_symlink() else None
    if broken_init:
        init.unlink()
        init.write_text("#!/bin/sh\necho 'sshfwup test: this init fails on purpose'\nexit 1\n")
        init.chmod(0o755)
    try:
        return Fw(version, firmware(vm, version).path)
    finally:
        if broken_init:
            init.unlink()
            if saved is not None:
                init.symlink_to(saved)



T = TypeVar("T")
ENV_KEYS = ("nerves_fw_active", "nerves_fw_validated", "nerves_fw_booted", "nerves_fw_autovalidate", "upgrade_available",
            "bootcount", "bootlimit")


@dataclass
class Device:
    portal: BlockingPortal
    running: Running

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``fn()`` in the portal's event loop; a Ctrl-C here cancels it there (``portal.call``
        would let it run on to its own deadline, keeping pytest from exiting)."""
        future = self.portal.start_task_soon(fn)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def sh(self, command: str, timeout: float = 60) -> Exec:
        return self.call(lambda: guest_exec(self.running.agent, ["/bin/sh", "-c", command], timeout=timeout))

    def ssh(self, *command: str, stdin: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        argv = self.running.ssh_argv(*command)
        if stdin is not None:
            argv.insert(-len(command) - 1, "-s")
            with stdin.open("rb") as f:
                out = subprocess.run(argv, stdin=f, capture_output=True, timeout=timeout, check=False)
            return subprocess.CompletedProcess(argv, out.returncode, out.stdout.decode(errors="replace"),
                                               out.stderr.decode(errors="replace"))  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def status(self, timeout: float = 30) -> dict[str, Any]:
        """``status --json`` (raises if sshfwup does not answer)."""
        result = self.ssh("status", "--json", timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"status failed (exit {result.returncode}): {result.stderr.strip()}")
        return dict(json.loads(result.stdout))

    def status_text(self) -> str:
        result = self.ssh("status", timeout=30)
        return result.stdout + result.stderr

    def get(self, path: str = "/", timeout: float = 5) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.running.app_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def env(self) -> dict[str, str]:
        out = self.sh("fw_printenv " + " ".join(ENV_KEYS)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def power_cut(self, timeout: float = 300) -> float:
        """SIGKILL QEMU, power on again, wait until sshfwup answers; seconds to that answer."""
        self.call(lambda: kill_power(self.running))
        return self.call(lambda: wait_booted(self.running, timeout))

    def wait_status(self, ok: Any, *, timeout: float = 300, what: str = "") -> dict[str, Any]:
        """Poll ``status --json`` until ``ok(status)``; the last status in the error."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.status(timeout=30)
                if ok(last):
                    return last
            except (AssertionError, subprocess.TimeoutExpired, ValueError) as e:
                last = repr(e)
            time.sleep(2)
        raise AssertionError(f"{what or 'status'} not reached within {timeout:.0f} s; last status: {last}")


def app_version(status: dict[str, Any]) -> str | None:
    app = status.get("app") or {}
    return app.get("version")


def settled(device: Device, version: str | None = None, *, timeout: float = 400) -> dict[str, Any]:
    """Until sshfwup runs the app of the booted slot, validated, nothing pending."""

    def ok(s: dict[str, Any]) -> bool:
        app = s.get("app") or {}
        return (app.get("state") == "running" and s["validated"] and not s["pending_reboot"]
                and s["active"] == s["running_root"] and not s["update_in_progress"]
                and (version is None or app.get("version") == version))  # fmt: skip

    return device.wait_status(ok, timeout=timeout, what=f"settled{' on ' + version if version else ''}")


def upload(device: Device, fw: Fw) -> subprocess.CompletedProcess[str]:
    """``ssh -s fwup < FW``, which must succeed."""
    result = device.ssh("fwup", stdin=fw.path)
    assert result.returncode == 0, f"upload of {fw.version} failed:\n{result.stdout}{result.stderr}"
    return result


def console_since(device: Device, start: int) -> str:
    """The serial console from byte ``start`` (its size at some earlier moment) on."""
    return device.running.console.read_bytes()[start:].decode(errors="replace")


def wait_rebooted(device: Device, since: float, timeout: float = 300) -> None:
    """Until the guest agent answers from a boot that started after ``since`` (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            up = float(device.sh("cut -d' ' -f1 /proc/uptime", timeout=10).stdout or "1e9")
            if up < time.monotonic() - since + 5:
                return
        except Exception:  # noqa: BLE001 - the agent is down while it reboots
            pass
        time.sleep(2)
    raise AssertionError(f"the device did not reboot within {timeout:.0f} s")


def reboot(device: Device) -> float:
    """``systemctl reboot`` on the device (a watchdog's or an operator's reboot); when it was asked."""
    t = time.monotonic()
    try:
        device.sh("systemctl reboot", timeout=10)
    except Exception:  # noqa: BLE001 - it may go down before the agent reports the exit
        pass
    return t


@dataclass
class Load:
    """HTTP GETs on the app from ``workers`` threads until stopped; every failure kept."""

    device: Device
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    pause: float = 0.0  # between requests, per worker (light load)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = self.device.get("/", timeout=10)
                if status == 200:
                    self.ok += 1
                    self.versions.add(body.split('"version": "')[1].split('"')[0] if '"version": "' in body else body)
                else:
                    self.failed.append(f"HTTP {status}")
            except OSError as e:
                self.failed.append(repr(e))
            if self.pause:
                self.stop.wait(self.pause)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self.run, daemon=True) for _ in range(2)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(15)


@dataclass
class CutUpload:
    """An upload through OpenSSH (``ssh -s ... fwup``) fed by us, byte-counted, so that the
    power can be cut once ``cut_at`` bytes were sent."""

    device: Device
    firmware: Path
    cut_at: int
    sent: int = 0

    def run(self) -> subprocess.Popen[bytes]:
        argv = self.device.running.ssh_argv("fwup")
        argv.insert(-2, "-s")
        upload = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert upload.stdin is not None
        try:
            with self.firmware.open("rb") as f:
                while self.sent < self.cut_at:
                    chunk = f.read(min(1 << 16, self.cut_at - self.sent))
                    if not chunk:
                        break
                    upload.stdin.write(chunk)
                    self.sent += len(chunk)
                upload.stdin.flush()
        except BrokenPipeError:
            pass
        return upload
