"""The update-safety model: a simulated device driven by random sequences of uploads, faults and
commands, with the invariants that must hold after every step (real fwup, real OpenSSH client).

Used by tests/sim/test_model.py (a fixed, bounded budget in CI) and bench/soak.py (N steps, with the
(state, event) pairs covered). Each rule drives the device and then waits until it settles (up,
ready, no update in progress), so every invariant is checked on a device at rest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sshfwup.sim.device import SimDevice, cleanup
from sshfwup.sim.host import KeyPair, free_port, ssh_keygen
from sshfwup.sim.machine import SimMachine
from sshfwup.sim.rootfs import build_sample_firmware

SSH_OPTIONS = (
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
)  # fmt: skip

# Fast app timings: the model spends its budget on events, not on waiting.
CONFIG = {"app": {"ready_timeout": 3, "observe": 1.0, "drain_timeout": 2}, "device": {"reboot_delay": 0.2}}

# Documented reasons a good upload may be refused (README: pending reboot; fwup: unvalidated).
ALLOWED_REFUSALS = ("a reboot is pending", "is not validated yet", "already running")


class ModelViolation(AssertionError):
    """An invariant does not hold; the message says which and shows the device's state."""


@dataclass
class Firmwares:
    """Firmware built on demand with real fwup, one new version per request."""

    root: Path
    counter: int = 0
    by_version: dict[str, Path] = field(default_factory=dict)

    def make(self, **kwargs: Any) -> tuple[str, Path]:
        self.counter += 1
        version = f"1.{self.counter}.0"
        path = build_sample_firmware(self.root / version, version=version, **kwargs)
        self.by_version[version] = path
        return version, path


class ModelDevice:
    """One simulated device, driven synchronously, with the model's bookkeeping."""

    def __init__(self, workdir: Path, key: KeyPair) -> None:
        self.workdir = workdir
        self.key = key
        self.firmwares = Firmwares(workdir / "firmware")
        v1, fw1 = self.firmwares.make()
        self.path = workdir / "device"
        self.device = SimDevice.create(
            self.path, firmware=fw1, authorized_keys=[key.public_line], ssh_port=free_port(), app_port=free_port(),
            config_overrides=CONFIG,
        )  # fmt: skip
        self.machine = SimMachine.start(self.path)
        self.boots = 0
        self.running_hash: tuple[str, str] | None = None  # (slot, sha256 of its first MiB) at boot
        self.events: Counter[tuple[str, str]] = Counter()
        self.log: list[str] = []
        self.settle(boot=1)

    # --- driving -------------------------------------------------------------------------------

    def ssh(self, *args: str, input: bytes | None = None, timeout: float = 60, subsystem: bool = False
            ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        argv = ["ssh", *SSH_OPTIONS, "-i", str(self.key.private), "-p", str(self.device.ssh_port)]
        argv += ["-s"] if subsystem else []
        return subprocess.run([*argv, "root@127.0.0.1", *args], input=input, capture_output=True, timeout=timeout)

    def upload(self, data: bytes) -> subprocess.CompletedProcess[bytes]:
        return self.ssh("fwup", input=data, subsystem=True, timeout=120)

    def status(self) -> dict[str, Any]:
        result = self.ssh("status", "--json", timeout=30)
        if result.returncode != 0:
            raise ModelViolation(f"status failed: {result.stderr.decode(errors='replace')}")
        return json.loads(result.stdout)

    def env(self) -> dict[str, str]:
        return self.device.env()

    def state(self) -> Any:
        return self.machine.state()

    def settle(self, *, boot: int | None = None, timeout: float = 60) -> None:
        """Until the machine is up and ready (after boot ``boot`` if given) and no update runs."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.state()
            if s is not None and s.state == "up" and s.ready and (boot is None or s.boot_count >= boot):
                break
            if self.machine.process.poll() is not None:
                raise ModelViolation(f"the machine exited: {self.machine.log_tail()}")
            if time.monotonic() > deadline:
                raise ModelViolation(f"the device did not come up (state {s}); SSH must always come up\n"
                                     f"{self.machine.log_tail()}")  # fmt: skip
            time.sleep(0.05)
        if s.boot_count != self.boots:
            self.boots = s.boot_count
            self.running_hash = (s.slot, self.device.slot_bytes_sha256(s.slot, 1 << 20))
        while True:
            st = self.status()
            if not st["update_in_progress"]:
                return
            if time.monotonic() > deadline:
                raise ModelViolation(f"an update stayed in progress: {st}")
            time.sleep(0.1)

    def wait_reboot(self, before: int, timeout: float = 60) -> None:
        """After the device announced a reboot: until the next boot is up. (While it shuts down,
        its data partition is unmounted and SSH refuses every key: the model waits for the boot.)"""
        deadline = time.monotonic() + 30
        while True:
            s = self.state()
            if s is not None and s.boot_count > before:
                break
            if time.monotonic() > deadline:
                raise ModelViolation(f"a reboot was announced but did not happen (state {s})")
            time.sleep(0.05)
        self.settle(timeout=timeout)

    def close(self) -> None:
        try:
            if self.machine.process.poll() is None:
                os.kill(self.machine.process.pid, 15)
                try:
                    self.machine.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.machine.process.kill()
                    self.machine.process.wait()
        finally:
            cleanup(self.path)

    # --- the abstract state, for coverage -------------------------------------------------------

    def abstract_state(self) -> str:
        env = self.env()
        s = self.state()
        active, running = env.get("nerves_fw_active"), s.slot if s else None
        other = "b" if running == "a" else "a"
        parts = ["pending" if active != running else "settled",
                 "validated" if env.get("nerves_fw_validated") == "1" else "unvalidated",
                 f"other-{env.get(f'{other}.sshfwup_state') or ('whole' if env.get(f'{other}.nerves_fw_version') else 'empty')}"]  # fmt: skip
        return "/".join(parts)

    def record(self, event: str, state: str) -> None:
        self.events[(state, event)] += 1
        self.log.append(f"{state} --{event}-->")

    # --- invariants ------------------------------------------------------------------------------

    def check(self) -> None:
        """The invariants. The device validates a first boot on its own after its observation
        window, so a disagreement is looked at again for a few seconds before it counts."""
        deadline = time.monotonic() + 4
        while True:
            try:
                self._check_once()
                return
            except ModelViolation:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def _check_once(self) -> None:
        env = self.env()
        s = self.state()
        st = self.status()
        where = f"\nenv: {env}\nmachine: {s}\nstatus: {st}\nlast steps: {self.log[-8:]}"
        running = s.slot
        # the running root was never written
        if self.running_hash is not None and self.running_hash[0] == running:
            now = self.device.slot_bytes_sha256(running, 1 << 20)
            if now != self.running_hash[1]:
                raise ModelViolation(f"the running root (slot {running}) was written to{where}")
        # the next boot, and the bootloader's fallback after it, reach a complete firmware
        active = env.get("nerves_fw_active")
        if active not in ("a", "b"):
            raise ModelViolation(f"the boot env names no slot{where}")

        def usable(slot: str) -> bool:
            return bool(env.get(f"{slot}.nerves_fw_version")) and not env.get(f"{slot}.sshfwup_state")

        if not usable(active):
            raise ModelViolation(f"the next boot (slot {active}) is not a complete firmware{where}")
        other = "b" if active == "a" else "a"
        if env.get("nerves_fw_validated") != "1" and not usable(other):
            raise ModelViolation(f"an unvalidated firmware in slot {active} is the only choice{where}")
        # status agrees with the env and the mount table
        if st["active"] != active or st["running_root"] != running:
            raise ModelViolation(f"status disagrees with the env or the running slot{where}")
        if st["pending_reboot"] != (active != running):
            raise ModelViolation(f"status's pending_reboot is wrong{where}")
        if st["validated"] != (env.get("nerves_fw_validated") == "1"):
            raise ModelViolation(f"status's validated is wrong{where}")
        # the app answers, and is the version status says
        app = st.get("app")
        if app is None:
            raise ModelViolation(f"no app runs and status does not say why{where}")
        try:
            with __import__("urllib.request").request.urlopen(
                f"http://127.0.0.1:{self.device.app_port}/", timeout=5
            ) as r:  # fmt: skip
                answered = json.loads(r.read())
        except OSError as e:
            raise ModelViolation(f"the app does not answer ({e}){where}") from None
        if answered.get("version") != app["version"]:
            raise ModelViolation(f"the app answers {answered.get('version')}, status says {app['version']}{where}")


def upload_in_background(dev: ModelDevice, data: bytes) -> threading.Thread:
    def run() -> None:
        try:
            dev.upload(data)
        except (subprocess.TimeoutExpired, OSError):
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="sshfwup-model-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def garbage(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_key(workdir: Path) -> KeyPair:
    return ssh_keygen(workdir / "key")
