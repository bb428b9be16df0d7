"""The model's device: a simulated device under one boot contract, driven synchronously, with the
invariants of a device at rest and the snapshot every event is compared with."""

from __future__ import annotations

import json
import os
import random
import re
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


class ModelledDevice:
    """What the model's events and checks use of a device, whatever runs it (the simulator:
    ``ModelDevice``; the QEMU device: ``vm_device.VmModelDevice``): the shared waits, the abstract
    state, the bookkeeping and the invariants at rest. A subclass gives the primitives — SSH's
    argv, the boot record, the machine's state and console, slot hashes, a power cut, the app's
    URL — and, as class attributes, the timings its machine needs."""

    SETTLE_TIMEOUT = 60.0  # until up, ready, no update in progress
    REBOOT_START_TIMEOUT = 30.0  # from a reboot's announcement until the next boot began
    VERDICT_TIMEOUT = 30.0  # from a trial boot until it validated or fell back
    UPLOAD_TIMEOUT = 120.0
    CHECK_GRACE = 4.0  # an invariant's disagreement is looked at again this long (first-boot validation)
    POLL = 0.05  # between two reads of the machine's state
    # the line the console shows at each boot: what the device logged before it, it logged
    # before it went down (changes.validated_before_boot)
    BOOT_LINE: re.Pattern[str]

    spec: ContractSpec
    firmwares: Any  # make(**kwargs) -> (version, path); by_version; crashing (see Firmwares)

    def _start_bookkeeping(self) -> None:
        self.boots = 0
        self.running_hash: tuple[str, str] | None = None  # (slot, sha256 of its first MiB) at boot
        self.events: Counter[tuple[str, str]] = Counter()
        self.log: list[str] = []
        self.fixed: dict[str, bytes] = {}  # refused or failing uploads, built once per device

    def _check_factory_env(self) -> None:
        env = self.env()
        wrong = {k: env.get(k) for k, v in self.spec.factory.items() if env.get(k) != v}
        if wrong:
            raise ModelViolation(f"a new {self.spec.name} device's boot env has {wrong}, the contract's factory "
                                 f"env says {dict(self.spec.factory)}")  # fmt: skip

    # --- the primitives a device gives ----------------------------------------------------------

    def ssh_argv(self, *args: str, subsystem: bool = False) -> list[str]:
        """OpenSSH's argv for ``args`` on the device (``subsystem``: ``ssh -s``)."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """The boot record the contract reads (for the U-Boot contracts: the U-Boot env)."""
        raise NotImplementedError

    def state(self) -> Any:
        """The machine's state (``state``, ``ready``, ``boot_count``, ``slot``), or None."""
        raise NotImplementedError

    def console(self) -> str:
        """The machine's console log, all boots."""
        raise NotImplementedError

    def console_tail(self) -> str:
        raise NotImplementedError

    def gone(self) -> str | None:
        """Why the machine is no longer there (its process exited), or None."""
        raise NotImplementedError

    def slot_sha256(self, slot: str, nbytes: int | None = None) -> str:
        """sha256 of the slot's first ``nbytes`` bytes (None: every byte the model compares)."""
        raise NotImplementedError

    def power_cut(self) -> None:
        """Cut the power and switch it on again (returns at once; the next boot follows)."""
        raise NotImplementedError

    def power_cut_delay(self) -> float:
        """How long after an upload starts a power-cut event cuts, when the event names no moment."""
        return 0.5

    @property
    def app_url(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # --- driving -------------------------------------------------------------------------------

    def ssh(self, *args: str, input: bytes | None = None, timeout: float = 60, subsystem: bool = False
            ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        return subprocess.run(self.ssh_argv(*args, subsystem=subsystem), input=input, capture_output=True,
                              timeout=timeout)  # fmt: skip

    def upload(self, data: bytes) -> subprocess.CompletedProcess[bytes]:
        return self.ssh("fwup", input=data, subsystem=True, timeout=self.UPLOAD_TIMEOUT)

    def status(self) -> dict[str, Any]:
        # ssh's own failure (255: no connection, or the device went down under it — a reboot
        # the device asked for itself) is asked again once the device is back; sshfwup's is not.
        for _ in range(3):
            result = self._status_once()
            if result.returncode != 255:
                break
            self.settle()
        return self._status_json(result)

    def _status_once(self) -> subprocess.CompletedProcess[bytes]:
        return self.ssh("status", "--json", timeout=30)

    @staticmethod
    def _status_json(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
        if result.returncode != 0:
            raise ModelViolation(f"status failed (exit status {result.returncode}): "
                                 f"{result.stderr.decode(errors='replace')}")  # fmt: skip
        return json.loads(result.stdout)

    def settle(self, *, boot: int | None = None, timeout: float | None = None) -> None:
        """Until the machine is up and ready (after boot ``boot`` if given) and no update runs."""
        deadline = time.monotonic() + (self.SETTLE_TIMEOUT if timeout is None else timeout)
        while True:
            s = self.state()
            if s is not None and s.state == "up" and s.ready and (boot is None or s.boot_count >= boot):
                break
            gone = self.gone()
            if gone is not None:
                raise ModelViolation(f"the machine exited: {gone}")
            if time.monotonic() > deadline:
                raise ModelViolation(f"the device did not come up (state {s}); SSH must always come up\n"
                                     f"{self.console_tail()}")  # fmt: skip
            time.sleep(self.POLL)
        if s.boot_count != self.boots:
            self.boots = s.boot_count
            self.running_hash = (s.slot, self.slot_sha256(s.slot, 1 << 20))
        while True:
            result = self._status_once()
            if result.returncode == 255 and time.monotonic() < deadline:
                return self.settle(boot=boot, timeout=deadline - time.monotonic())  # it went down: again
            st = self._status_json(result)
            if not st["update_in_progress"]:
                return
            if time.monotonic() > deadline:
                raise ModelViolation(f"an update stayed in progress: {st}")
            time.sleep(max(self.POLL, 0.1))

    def wait_reboot(self, before: int, timeout: float | None = None) -> None:
        """After the device announced a reboot: until the next boot is up. (While it shuts down,
        its data partition is unmounted and SSH refuses every key: the model waits for the boot.)"""
        deadline = time.monotonic() + self.REBOOT_START_TIMEOUT
        while True:
            s = self.state()
            if s is not None and s.boot_count > before:
                break
            if time.monotonic() > deadline:
                raise ModelViolation(f"a reboot was announced but did not happen (state {s})")
            time.sleep(self.POLL)
        self.settle(timeout=timeout)

    def wait_verdict(self, boot: int, timeout: float | None = None) -> None:
        """After boot ``boot`` ran new firmware: until the device decided on it — validated it, or
        fell back and booted again — then until it settles. (Its fallback reboot comes after the
        app's ready timeout: an event fired before it would meet a device going down.)"""
        timeout = self.VERDICT_TIMEOUT if timeout is None else timeout
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
            time.sleep(max(self.POLL, 0.1))
        self.settle(timeout=timeout)

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
        deadline = time.monotonic() + self.CHECK_GRACE
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
            now = self.slot_sha256(running, 1 << 20)
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
            with urllib.request.urlopen(self.app_url, timeout=5) as r:
                answered = json.loads(r.read())
        except OSError as e:
            raise ModelViolation(f"the app does not answer ({e}){where}") from None
        if answered.get("version") != app["version"]:
            raise ModelViolation(f"the app answers {answered.get('version')}, status says {app['version']}{where}")

class ModelDevice(ModelledDevice):
    """One simulated device under one boot contract, driven synchronously, with the model's
    bookkeeping."""

    BOOT_LINE = re.compile(r"sshfwup\.sim\.machine: boot \d+: ")  # sshfwup/sim/machine.py

    def __init__(self, workdir: Path, key: KeyPair, config: dict[str, Any] | None = None,
                 contract_name: str = DEFAULT_CONTRACT) -> None:  # fmt: skip
        self.workdir = workdir
        self.key = key
        self.spec = contract(contract_name)
        self.firmwares = Firmwares(workdir / "firmware", conf=self.spec.fwup_conf())
        v1, fw1 = self.firmwares.make()
        self.path = workdir / "device"
        overrides = {**(config or CONFIG), **self.spec.config()}
        self.device = SimDevice.create(
            self.path, firmware=fw1, authorized_keys=[key.public_line], ssh_port=free_port(), app_port=free_port(),
            config_overrides=overrides, ops_conf=self.spec.ops_conf(),
        )  # fmt: skip
        self.machine = SimMachine.start(self.path)
        self._start_bookkeeping()
        self.settle(boot=1)
        self._check_factory_env()

    def ssh_argv(self, *args: str, subsystem: bool = False) -> list[str]:
        argv = ["ssh", *SSH_OPTIONS, "-i", str(self.key.private), "-p", str(self.device.ssh_port)]
        argv += ["-s"] if subsystem else []
        return [*argv, "root@127.0.0.1", *args]

    def env(self) -> dict[str, str]:
        return self.spec.boot_record(self.device)

    def state(self) -> Any:
        return self.machine.state()

    def console(self) -> str:
        """The machine's console log (U-Boot's decisions, the server's log lines), all boots."""
        try:
            return self.machine.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def console_tail(self) -> str:
        return self.machine.log_tail()

    def gone(self) -> str | None:
        return None if self.machine.process.poll() is None else self.machine.log_tail()

    def slot_sha256(self, slot: str, nbytes: int | None = None) -> str:
        span = self.device.layout.slot_span("a")[1] if nbytes is None else nbytes
        return self.device.slot_bytes_sha256(slot, span)

    def power_cut(self) -> None:
        self.machine.power_cut()

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.device.app_port}/"

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


def upload_in_background(dev: ModelledDevice, data: bytes) -> threading.Thread:
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


def snapshot(dev: ModelledDevice) -> Snapshot:
    # The console's length first: a first-boot validation logged after it is judged from the log
    # (changes.validated_before_boot), one logged before it wrote the env before the env is read.
    # (Read after the env and the slot hashes, a validation in between was in neither.)
    console_at = len(dev.console())
    st = dev.status()
    app = st.get("app") or {}
    keep = ("running_root", "active", "pending_reboot", "slots", "running_uuid")
    return Snapshot(
        env=dev.env(),
        slots={s: dev.slot_sha256(s) for s in ("a", "b")},
        app=(app.get("version"), app.get("pid")),
        status={k: st.get(k) for k in keep},
        console_at=console_at,
        boots=dev.state().boot_count,
    )
