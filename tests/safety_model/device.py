"""The model's device: a simulated device under one boot contract, driven synchronously, with the
invariants of a device at rest and the snapshot every event is compared with."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sshfwup.sim.device import SimDevice, cleanup
from sshfwup.sim.host import KeyPair, free_port, ssh_keygen
from sshfwup.sim.machine import SimMachine
from sshfwup.sim.rootfs import build_sample_firmware

from .contracts import DEFAULT_CONTRACT, MARK, SLOTS, ContractSpec, contract, other

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
    conf: Path | None = None  # the contract's fwup.conf (None: the simulator's)
    counter: int = 0
    by_version: dict[str, Path] = field(default_factory=dict)
    # versions whose app crashes a while after each start: if one outlives its observation window
    # and is validated, the supervisor restarts it again and again, whatever event runs
    crashing: set[str] = field(default_factory=set)

    def make(self, **kwargs: Any) -> tuple[str, Path]:
        self.counter += 1
        version = f"1.{self.counter}.0"
        path = build_sample_firmware(self.root / version, version=version, conf=self.conf, **kwargs)
        self.by_version[version] = path
        if "crash_after" in (kwargs.get("app_behavior") or {}):
            self.crashing.add(version)
        return version, path


def usable(env: dict[str, str], slot: str) -> bool:
    """A whole firmware sshfwup did not give up on: fwup described it, and no mark says otherwise."""
    return bool(env.get(f"{slot}.nerves_fw_version")) and not env.get(f"{slot}.{MARK}")


class ModelDevice:
    """One simulated device under one boot contract, driven synchronously, with the model's
    bookkeeping."""

    def __init__(self, workdir: Path, key: KeyPair, config: dict[str, Any] | None = None,
                 contract_name: str = DEFAULT_CONTRACT) -> None:  # fmt: skip
        self.workdir = workdir
        self.key = key
        self.spec: ContractSpec = contract(contract_name)
        self.firmwares = Firmwares(workdir / "firmware", conf=self.spec.fwup_conf())
        v1, fw1 = self.firmwares.make()
        self.path = workdir / "device"
        overrides = {**(config or CONFIG), **self.spec.config()}
        self.device = SimDevice.create(
            self.path, firmware=fw1, authorized_keys=[key.public_line], ssh_port=free_port(), app_port=free_port(),
            config_overrides=overrides, ops_conf=self.spec.ops_conf(),
        )  # fmt: skip
        self.machine = SimMachine.start(self.path)
        self.boots = 0
        self.running_hash: tuple[str, str] | None = None  # (slot, sha256 of its first MiB) at boot
        self.events: Counter[tuple[str, str]] = Counter()
        self.log: list[str] = []
        self.fixed: dict[str, bytes] = {}  # refused or failing uploads, built once per device
        self.settle(boot=1)
        env = self.env()
        wrong = {k: env.get(k) for k, v in self.spec.factory.items() if env.get(k) != v}
        if wrong:
            raise ModelViolation(f"a new {self.spec.name} device's boot env has {wrong}, the contract's factory "
                                 f"env says {dict(self.spec.factory)}")  # fmt: skip

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
        """The boot record the contract reads (for the U-Boot contracts: the U-Boot env)."""
        return self.spec.boot_record(self.device)

    def state(self) -> Any:
        return self.machine.state()

    def console(self) -> str:
        """The machine's console log (U-Boot's decisions, the server's log lines), all boots."""
        try:
            return self.machine.log_path.read_text(errors="replace")
        except OSError:
            return ""

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

    def wait_verdict(self, boot: int, timeout: float = 30) -> None:
        """After boot ``boot`` ran new firmware: until the device decided on it — validated it, or
        fell back and booted again — then until it settles. (Its fallback reboot comes after the
        app's ready timeout: an event fired before it would meet a device going down.)"""
        deadline = time.monotonic() + timeout
        while True:
            s = self.state()
            if s is not None and s.boot_count > boot:
                break
            if s is not None and s.state == "up" and self.spec.view(self.env()).validated:
                break
            if time.monotonic() > deadline:
                raise ModelViolation(f"no verdict on the firmware of boot {boot} within {timeout:.0f} s: neither "
                                     f"validated nor fallen back (state {s}, env {self.env()})")  # fmt: skip
            time.sleep(0.1)
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

    def abstract_state(self, snap: Snapshot | None = None) -> str:
        """The state as the model names it: now, or as ``snap`` saw it (an event is judged
        against the snapshot it starts from, so its state must be read from that same snapshot:
        the device may validate its first boot between two reads)."""
        if snap is not None:
            env, running = snap.env, snap.status.get("running_root")
        else:
            env = self.env()
            s = self.state()
            running = s.slot if s else None
        view = self.spec.view(env)
        there = other(running) if running in SLOTS else "a"
        whole = "whole" if env.get(f"{there}.nerves_fw_version") else "empty"
        parts = ["pending" if view.active != running else "settled",
                 "validated" if view.validated else "unvalidated",
                 f"other-{env.get(f'{there}.{MARK}') or whole}"]  # fmt: skip
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
        from .space import space  # (space imports the events, which import this module)

        env = self.env()
        s = self.state()
        st = self.status()
        view = self.spec.view(env)
        where = f"\ncontract: {self.spec.name}\nenv: {env}\nmachine: {s}\nstatus: {st}\nlast steps: {self.log[-8:]}"
        running = s.slot
        # the device is in a state the model's space calls reachable (its reason says why not)
        why = space(self.spec.name).impossible(self.abstract_state(), "*")
        if why and self.spec.fallback_validated:  # (fwup-ops: the fallback proves itself again first)
            raise ModelViolation(f"the device is in {self.abstract_state()}, a state the model calls impossible: "
                                 f"{why}{where}")  # fmt: skip
        # the running root was never written
        if self.running_hash is not None and self.running_hash[0] == running:
            now = self.device.slot_bytes_sha256(running, 1 << 20)
            if now != self.running_hash[1]:
                raise ModelViolation(f"the running root (slot {running}) was written to{where}")
        # the next boots, and the bootloader's fallback after them, reach complete firmware only
        if view.active not in SLOTS:
            raise ModelViolation(f"the boot env names no slot{where}")
        for slot in dict.fromkeys(view.forecast):
            if not usable(env, slot):
                raise ModelViolation(f"the next boots (slots {', '.join(view.forecast)} if nothing validates) reach "
                                     f"slot {slot}, which is not a complete firmware{where}")  # fmt: skip
        # status agrees with the env (as the contract reads it) and the mount table
        if st["active"] != view.active or st["running_root"] != running:
            raise ModelViolation(f"status disagrees with the env or the running slot{where}")
        if st["pending_reboot"] != (view.active != running):
            raise ModelViolation(f"status's pending_reboot is wrong{where}")
        if st["validated"] != view.validated:
            raise ModelViolation(f"status's validated is wrong{where}")
        if st.get("boot_contract") != self.spec.name or st.get("trial_boot") != view.trial:
            raise ModelViolation(f"status's boot_contract/trial_boot ({st.get('boot_contract')}, {st.get('trial_boot')}) "
                                 f"is not the contract's reading ({self.spec.name}, {view.trial}){where}")  # fmt: skip
        if bool(st.get("boot_warnings")) != self.spec.warns(env):
            raise ModelViolation(f"status's boot_warnings {st.get('boot_warnings')} do not match the env under "
                                 f"{self.spec.name}{where}")  # fmt: skip
        # the app answers, and is the version status says
        app = st.get("app")
        if app is None:
            raise ModelViolation(f"no app runs and status does not say why{where}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.device.app_port}/", timeout=5) as r:
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


@dataclass(frozen=True)
class Snapshot:
    """Everything an event could change: every boot env key, each slot's bytes, the app, status."""

    env: dict[str, str]
    slots: dict[str, str]  # slot -> sha256 of all its bytes
    app: tuple[Any, Any]  # (version, pid) as status names them
    status: dict[str, Any]  # the parts of status --json that describe the device, not the moment
    console_at: int = 0  # the console log's length then: what the device logged since is after it
    boots: int = 0  # the machine's boot count then

    def changes(self, after: Snapshot, *, ignore: tuple[str, ...] = ()) -> list[str]:
        out = []
        for key in sorted(set(self.env) | set(after.env)):
            if key not in ignore and self.env.get(key) != after.env.get(key):
                out.append(f"env {key}: {self.env.get(key)!r} -> {after.env.get(key)!r}")
        out += [f"slot {s} bytes" for s in sorted(self.slots) if self.slots[s] != after.slots.get(s)]
        if self.app != after.app and "app" not in ignore:
            out.append(f"app (version, pid): {self.app} -> {after.app}")
        return out

    def changed_keys(self, after: Snapshot) -> set[str]:
        return {k for k in set(self.env) | set(after.env) if self.env.get(k) != after.env.get(k)}


def snapshot(dev: ModelDevice) -> Snapshot:
    # The console's mark first: a line the device logs while the rest is read (its own validation
    # of a first boot, say) is then after the mark, where the checks look for it — never lost
    # between an env read that missed the write and a mark taken after the line.
    console_at, boots = len(dev.console()), dev.state().boot_count
    st = dev.status()
    span = dev.device.layout.slot_span("a")[1]
    app = st.get("app") or {}
    keep = ("running_root", "active", "pending_reboot", "slots", "running_uuid")
    return Snapshot(
        env=dev.env(),
        slots={s: dev.device.slot_bytes_sha256(s, span) for s in ("a", "b")},
        app=(app.get("version"), app.get("pid")),
        status={k: st.get(k) for k in keep},
        console_at=console_at,
        boots=boots,
    )
