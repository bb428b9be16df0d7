"""The update-safety model: a simulated device driven by random sequences of uploads, faults and
commands, with the invariants that must hold after every step (real fwup, real OpenSSH client).

Used by tests/sim/test_model.py (a fixed, bounded budget in CI) and bench/soak.py (N steps, with the
(state, event) pairs covered). Each event drives the device and then waits until it settles (up,
ready, no update in progress), so every invariant is checked on a device at rest.

Two kinds of check follow every event: the invariants of a device at rest (``ModelDevice.check``)
and what the event was allowed to change (``ModelDevice.check_change``): a snapshot of every boot
env key, a hash of each slot's bytes, the app (version, pid) and ``status --json`` before and after
the event. A refusal changes nothing; a failure while fwup wrote changes only its target slot and
that slot's mark; ``revert`` succeeds exactly when there is a whole firmware to go back to; "not
changed" in a message is true.

``walk_pairs`` plans events to reach every (abstract state, event) pair of ``STATES`` x ``EVENTS``
that is not in ``IMPOSSIBLE`` (which says why each such pair cannot happen).
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

    def __init__(self, workdir: Path, key: KeyPair, config: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.key = key
        self.firmwares = Firmwares(workdir / "firmware")
        v1, fw1 = self.firmwares.make()
        self.path = workdir / "device"
        self.device = SimDevice.create(
            self.path, firmware=fw1, authorized_keys=[key.public_line], ssh_port=free_port(), app_port=free_port(),
            config_overrides=config or CONFIG,
        )  # fmt: skip
        self.machine = SimMachine.start(self.path)
        self.boots = 0
        self.running_hash: tuple[str, str] | None = None  # (slot, sha256 of its first MiB) at boot
        self.events: Counter[tuple[str, str]] = Counter()
        self.log: list[str] = []
        self.fixed: dict[str, bytes] = {}  # refused or failing uploads, built once per device
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


# --- what an event may change ------------------------------------------------------------------

# Words of a message that claims nothing changed (sshfwup's verdicts and journal lines).
NOT_CHANGED = ("the device was not changed", "nothing changed", "nothing was changed")
# Refusals that come before anything is written (sshfwup's prechecks, fwup's own refusals as
# measured with fwup 1.16: see sshfwup/update/update.py): after one of these nothing may change.
REFUSALS = (
    *ALLOWED_REFUSALS, "Expecting platform=", "Unrecognized archive format", "Please validate the running firmware",
    "Couldn't find applicable task", "Expecting signed firmware", "fails digital signature", "is older than the running",
    "another update is in progress",
)  # fmt: skip
# Keys the device's own validation of a first boot writes (it may end during any step).
SELF_VALIDATION = ("nerves_fw_validated", "upgrade_available", "bootcount")


@dataclass(frozen=True)
class Snapshot:
    """Everything an event could change: every boot env key, each slot's bytes, the app, status."""

    env: dict[str, str]
    slots: dict[str, str]  # slot -> sha256 of all its bytes
    app: tuple[Any, Any]  # (version, pid) as status names them
    status: dict[str, Any]  # the parts of status --json that describe the device, not the moment

    def changes(self, after: "Snapshot", *, ignore: tuple[str, ...] = ()) -> list[str]:
        out = []
        for key in sorted(set(self.env) | set(after.env)):
            if key not in ignore and self.env.get(key) != after.env.get(key):
                out.append(f"env {key}: {self.env.get(key)!r} -> {after.env.get(key)!r}")
        out += [f"slot {s} bytes" for s in sorted(self.slots) if self.slots[s] != after.slots.get(s)]
        if self.app != after.app and "app" not in ignore:
            out.append(f"app (version, pid): {self.app} -> {after.app}")
        return out

    def rolled_back_by_itself(self, after: "Snapshot") -> tuple[str, ...]:
        """A hot-swapped app that crashed rollback_after_crashes times is swapped back by the
        device itself, whenever that happens (the env goes back to the running slot, which is
        validated; the crashed slot is marked rolled-back): the keys that changed, or ()."""
        running = self.status["running_root"]
        other = "b" if running == "a" else "a"
        if (self.status["pending_reboot"] and after.env.get("nerves_fw_active") == running
                and after.env.get(f"{other}.sshfwup_state") == "rolled-back"
                and after.env.get("nerves_fw_validated") == "1"):  # fmt: skip
            return ("nerves_fw_active", *SELF_VALIDATION, f"{other}.sshfwup_state", "app")
        return ()


def snapshot(dev: "ModelDevice") -> Snapshot:
    st = dev.status()
    span = dev.device.layout.slot_span("a")[1]
    app = st.get("app") or {}
    keep = ("running_root", "active", "pending_reboot", "slots", "running_uuid")
    return Snapshot(
        env=dev.env(),
        slots={s: dev.device.slot_bytes_sha256(s, span) for s in ("a", "b")},
        app=(app.get("version"), app.get("pid")),
        status={k: st.get(k) for k in keep},
    )


@dataclass
class Result:
    """What the uploader or operator saw: exit status (None: no command) and text."""

    code: int | None
    text: str = ""


def check_change(dev: "ModelDevice", event: str, state: str, before: Snapshot, after: Snapshot, result: Result) -> None:
    """What ``event`` (fired in abstract ``state``) changed is what it may change."""
    where = f"\nevent: {event} in state {state}\nexit status: {result.code}\noutput: {result.text.strip()[-600:]}" \
            f"\nenv before: {before.env}\nenv after: {after.env}\nlast steps: {dev.log[-8:]}"  # fmt: skip
    # the device validating its own first boot meanwhile (0 -> 1) is not the event's doing
    ignore = SELF_VALIDATION if before.env.get("nerves_fw_validated") != "1" and after.env.get("nerves_fw_validated") == "1" else ()
    # ... nor is its rollback of a hot-swapped app that kept crashing
    ignore = before.rolled_back_by_itself(after) or ignore
    changed = before.changes(after, ignore=ignore)
    text = result.text
    if result.code is None:
        return
    if any(w in text for w in NOT_CHANGED) and changed:
        raise ModelViolation(f"{event}: the message says nothing changed, but: {'; '.join(changed)}{where}")
    refused = result.code != 0 and any(r in text for r in REFUSALS)
    if event == "revert":
        settled = not before.status["pending_reboot"]
        running = before.status["running_root"]
        other = "b" if running == "a" else "a"
        whole = bool(before.env.get(f"{other}.nerves_fw_version")) and not before.env.get(f"{other}.sshfwup_state")
        possible = not settled or whole
        if (result.code == 0) != possible:
            raise ModelViolation(f"revert {'succeeded' if result.code == 0 else 'was refused'}, but slot {other} "
                                 f"{'holds' if whole else 'does not hold'} a whole firmware{where}")  # fmt: skip
        refused = result.code != 0
    if event == "validate" and result.code != 0:
        refused = True
    if event == "same-upload" and result.code == 0:
        refused = True  # "already running": nothing to do
    if refused:
        if changed:
            raise ModelViolation(f"{event} was refused but changed: {'; '.join(changed)}{where}")
        return
    if result.code != 0 and event.startswith(("bad-upload", "cut-upload", "slow-tail", "hot-upload", "reboot-upload")):
        # a failure while fwup may have written: only its target slot and that slot's mark
        running = before.status["running_root"]
        target = "b" if (before.env.get("nerves_fw_active") or running) == "a" else "a"
        allowed = {f"slot {target} bytes"}
        for line in changed:
            if line in allowed:
                continue
            if line.startswith(f"env {target}.sshfwup_state:") and line.endswith("-> 'incomplete'"):
                continue
            raise ModelViolation(f"{event} failed and changed more than slot {target} and its mark: {line}{where}")
        if f"slot {target} bytes" in changed and after.env.get(f"{target}.sshfwup_state") != "incomplete":
            raise ModelViolation(f"{event} wrote slot {target} but left it unmarked{where}")


# --- the events ----------------------------------------------------------------------------------


def _out(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode("utf-8", errors="replace")


def _serves(dev: "ModelDevice", version: str, text: str, boots: int, what: str) -> None:
    """After an exit status 0: the new version serves, hot or after the reboot it announced."""
    if "rebooting into" in text:
        dev.wait_reboot(boots)
    else:
        dev.settle()
    served = dev.status()["app"]["version"]
    if served != version:
        raise ModelViolation(f"{what}: exit 0 but the app serves {served}, not {version}\n{text}")


def _refused_cleanly(dev: "ModelDevice", result: subprocess.CompletedProcess[bytes], before: dict[str, str], what: str) -> None:
    text = _out(result)
    if result.returncode != 1:
        raise ModelViolation(f"{what}: exit status {result.returncode}, expected 1\n{text}")
    env = dev.env()
    if env.get("nerves_fw_active") != before.get("nerves_fw_active"):
        raise ModelViolation(f"{what} changed nerves_fw_active: {before.get('nerves_fw_active')} -> "
                             f"{env.get('nerves_fw_active')}\n{text}")  # fmt: skip
    if before.get("nerves_fw_validated") == "1" and env.get("nerves_fw_validated") != "1":
        raise ModelViolation(f"{what} un-validated the running firmware\n{text}")


def _good_upload(dev: "ModelDevice", data: bytes, version: str, what: str) -> Result:
    before = dev.env()
    boots = dev.state().boot_count
    result = dev.upload(data)
    text = _out(result)
    if result.returncode == 0:
        _serves(dev, version, text, boots, what)
        return Result(0, text)
    if not any(reason in text for reason in ALLOWED_REFUSALS):
        raise ModelViolation(f"{what}: a good upload was refused without a documented reason\n{text}")
    _refused_cleanly(dev, result, before, what)
    dev.settle()
    return Result(result.returncode, text)


def _fixed(dev: "ModelDevice", name: str, **kwargs: Any) -> bytes:
    if name not in dev.fixed:
        dev.fixed[name] = dev.firmwares.make(**kwargs)[1].read_bytes()
    return dev.fixed[name]


def ev_hot_upload(dev: "ModelDevice", param: Any = None) -> Result:
    version, fw = dev.firmwares.make()
    return _good_upload(dev, fw.read_bytes(), version, "hot upload")


def ev_reboot_upload(dev: "ModelDevice", param: Any = None) -> Result:
    version, fw = dev.firmwares.make(changes=("system-file",))
    return _good_upload(dev, fw.read_bytes(), version, "reboot-requiring upload")


def ev_bad_upload(kind: str) -> Any:
    def run(dev: "ModelDevice", param: Any = None) -> Result:
        before = dev.env()
        if kind == "wrong-platform":
            data = _fixed(dev, "wrong-platform", platform="otherboard")
        else:
            data = bytearray(_fixed(dev, "plain"))
            if kind == "garbage":
                data = bytearray(garbage(len(data), len(data)))
            else:
                data[len(data) - 3000] ^= 0x10  # inside the root filesystem's data
        result = dev.upload(bytes(data))
        _refused_cleanly(dev, result, before, f"{kind} upload")
        dev.settle()
        return Result(result.returncode, _out(result))

    return run


def ev_cut_upload(dev: "ModelDevice", param: Any = None) -> Result:
    fraction = 0.5 if param is None else float(param)
    before = dev.env()
    data = _fixed(dev, "filler", filler=400 * 1024)
    result = dev.upload(data[: int(len(data) * fraction)])
    _refused_cleanly(dev, result, before, f"upload cut at {fraction:.4f}")
    dev.settle()
    return Result(result.returncode, _out(result))


def ev_slow_tail_upload(dev: "ModelDevice", param: Any = None) -> Result:
    version, fw = dev.firmwares.make()
    data = fw.read_bytes()
    # the uploader pauses before its last bytes; fwup's verdict must still stand
    argv = ["ssh", *SSH_OPTIONS, "-i", str(dev.key.private), "-p", str(dev.device.ssh_port),
            "-s", "root@127.0.0.1", "fwup"]  # fmt: skip
    before = dev.env()
    boots = dev.state().boot_count
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[:-100])
    proc.stdin.flush()
    time.sleep(0.5)
    proc.stdin.write(data[-100:])
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if result.returncode == 0:
        _serves(dev, version, _out(result), boots, "slow-tail upload")
    elif not any(reason in _out(result) for reason in ALLOWED_REFUSALS):
        raise ModelViolation(f"slow-tail upload refused without a documented reason\n{_out(result)}")
    else:
        _refused_cleanly(dev, result, before, "slow-tail upload")
        dev.settle()
    return Result(result.returncode, _out(result))


def ev_broken_app(kind: str) -> Any:
    def run(dev: "ModelDevice", param: Any = None) -> Result:
        behavior = {"never_ready": True} if kind == "never_ready" else {"crash_after": 2.5}
        version, fw = dev.firmwares.make(app_behavior=behavior)
        boots = dev.state().boot_count
        result = dev.upload(fw.read_bytes())
        text = _out(result)
        if result.returncode == 0 and "rebooting into" in text:
            dev.wait_reboot(boots)
        if kind == "crash_after" and result.returncode == 0:
            time.sleep(4)  # it crashes after the observation window: the device must notice
            # a hot swap: it is swapped back after rollback_after_crashes crashes; wait for that
            deadline = time.monotonic() + 20
            while "rebooting into" not in text and dev.status()["pending_reboot"] and time.monotonic() < deadline:
                time.sleep(0.5)
        dev.settle()
        if kind == "never_ready" and result.returncode == 0 and "rebooting into" not in text:
            raise ModelViolation(f"a version that never gets ready was hot-swapped in\n{text}")
        # the app's fate after exit 0 is the device's business (rolled back): no change check
        return Result(None if result.returncode == 0 else result.returncode, text)

    return run


def ev_power_cut(dev: "ModelDevice", param: Any = None) -> Result:
    delay = 0.5 if param is None else float(param)
    _, fw = dev.firmwares.make()
    boots = dev.state().boot_count
    thread = upload_in_background(dev, fw.read_bytes())
    time.sleep(delay)
    cut = dev.state().boot_count  # the upload may have rebooted the device already
    dev.machine.power_cut()
    dev.settle(boot=max(boots, cut) + 1)
    thread.join(timeout=60)
    return Result(None)


def ev_reboot(dev: "ModelDevice", param: Any = None) -> Result:
    boots = dev.state().boot_count
    result = dev.ssh("reboot")
    if result.returncode != 0:
        raise ModelViolation(f"reboot refused: {_out(result)}")
    dev.wait_reboot(boots)
    return Result(None)


def ev_validate(dev: "ModelDevice", param: Any = None) -> Result:
    result = dev.ssh("validate")
    if result.returncode not in (0, 1):
        raise ModelViolation(f"validate: exit status {result.returncode}: {_out(result)}")
    return Result(result.returncode, _out(result))


def ev_revert(dev: "ModelDevice", param: Any = None) -> Result:
    result = dev.ssh("revert")
    if result.returncode not in (0, 1):
        raise ModelViolation(f"revert: exit status {result.returncode}: {_out(result)}")
    dev.settle()
    return Result(result.returncode, _out(result))


def ev_same_upload(dev: "ModelDevice", param: Any = None) -> Result:
    version = dev.status()["app"]["version"]
    fw = dev.firmwares.by_version.get(version)
    if fw is None:
        raise ModelViolation(f"the model built no firmware {version}, which the app serves")
    result = dev.upload(fw.read_bytes())
    text = _out(result)
    if result.returncode == 0 and "already running" not in text:
        raise ModelViolation(f"the running firmware was uploaded again and not recognised\n{text}")
    if result.returncode != 0 and not any(r in text for r in ALLOWED_REFUSALS):
        raise ModelViolation(f"the running firmware's upload was refused without a documented reason\n{text}")
    dev.settle()
    return Result(result.returncode, text)


RUNNERS = {
    "hot-upload": ev_hot_upload,
    "reboot-upload": ev_reboot_upload,
    "bad-upload:garbage": ev_bad_upload("garbage"),
    "bad-upload:flipped": ev_bad_upload("flipped"),
    "bad-upload:wrong-platform": ev_bad_upload("wrong-platform"),
    "cut-upload": ev_cut_upload,
    "slow-tail-upload": ev_slow_tail_upload,
    "broken-app:never_ready": ev_broken_app("never_ready"),
    "broken-app:crash_after": ev_broken_app("crash_after"),
    "power-cut": ev_power_cut,
    "reboot": ev_reboot,
    "validate": ev_validate,
    "revert": ev_revert,
    "same-upload": ev_same_upload,
}
EVENTS = tuple(RUNNERS)


def fire(dev: "ModelDevice", event: str, param: Any = None) -> str:
    """One event: recorded against the abstract state it starts in, then checked for what it
    changed. Returns the state it started in. (The invariants at rest: ``dev.check()``.)"""
    state = dev.abstract_state()
    dev.record(event, state)
    before = snapshot(dev)
    result = RUNNERS[event](dev, param)
    check_change(dev, event, state, before, snapshot(dev), result)
    return state


# --- the state space, and a walk through every pair of it ---------------------------------------

STATES = tuple(f"{p}/{v}/other-{o}" for p in ("settled", "pending") for v in ("validated", "unvalidated")
               for o in ("empty", "whole", "incomplete", "rolled-back"))  # fmt: skip

_NO_FALLBACK = ("an unvalidated firmware boots only with a whole fallback: fwup switches only from a validated "
                "slot (upgrade.a/b require nerves_fw_validated=1) and sshfwup writes no slot while the running "
                "firmware is unvalidated (precheck), so the slot it came from stays whole")  # fmt: skip
_PENDING_OTHER = ("pending means the env names the slot that is not running as the next boot, and it names only "
                  "a slot fwup's on-finish just made whole (or revert's whole target)")  # fmt: skip
_PENDING_VALIDATED = ("nothing validates a firmware that has not booted: fwup's switch and a revert to an unproven "
                      "slot set nerves_fw_validated=0, and validate refuses while a reboot is pending")  # fmt: skip
# (state, event) -> why that pair cannot happen; "*" as the event: no event, the state is unreachable.
IMPOSSIBLE: dict[tuple[str, str], str] = {}
for _s in STATES:
    _p, _v, _o = _s.split("/")
    if _p == "pending" and _v == "validated":
        IMPOSSIBLE[(_s, "*")] = _PENDING_VALIDATED
    elif _p == "pending" and _o != "other-whole":
        IMPOSSIBLE[(_s, "*")] = _PENDING_OTHER
    elif _p == "settled" and _v == "unvalidated" and _o != "other-whole":
        IMPOSSIBLE[(_s, "*")] = _NO_FALLBACK
REACHABLE = tuple(s for s in STATES if (s, "*") not in IMPOSSIBLE)
PAIRS = tuple((s, e) for s in REACHABLE for e in EVENTS if (s, e) not in IMPOSSIBLE)


def impossible(state: str, event: str) -> str | None:
    return IMPOSSIBLE.get((state, "*")) or IMPOSSIBLE.get((state, event))


# Expected results of events used to move between states (a shortest path is planned over them;
# the actual state is always read back, so a surprise only costs a detour).
EDGES: dict[str, dict[str, str]] = {
    "settled/validated/other-empty": {"bad-upload:flipped": "settled/validated/other-incomplete",
                                      "broken-app:never_ready": "settled/validated/other-rolled-back",
                                      "hot-upload": "pending/unvalidated/other-whole"},
    "settled/validated/other-incomplete": {"hot-upload": "pending/unvalidated/other-whole"},
    "settled/validated/other-rolled-back": {"hot-upload": "pending/unvalidated/other-whole"},
    "settled/validated/other-whole": {"bad-upload:flipped": "settled/validated/other-incomplete",
                                      "broken-app:never_ready": "settled/validated/other-rolled-back",
                                      "hot-upload": "pending/unvalidated/other-whole"},
    "pending/unvalidated/other-whole": {"reboot": "settled/unvalidated/other-whole",
                                        "revert": "settled/validated/other-whole"},
    "settled/unvalidated/other-whole": {"validate": "settled/validated/other-whole"},
}  # fmt: skip
FRESH = "settled/validated/other-empty"

# Refusals: the pairs where the event is refused before anything is written (what issue 28's bug
# hid in). The CI sample walks all of these; the soak walks every pair.
_UPLOADS = ("hot-upload", "reboot-upload", "bad-upload:garbage", "bad-upload:flipped", "bad-upload:wrong-platform",
            "cut-upload", "slow-tail-upload", "broken-app:never_ready", "broken-app:crash_after", "same-upload")  # fmt: skip


def is_refusal(state: str, event: str) -> bool:
    pending, validated, other = state.split("/")
    if event in ("bad-upload:garbage", "bad-upload:wrong-platform"):
        return True
    if event in _UPLOADS and (pending == "pending" or validated == "unvalidated"):
        return True
    if event == "revert":
        return pending == "settled" and other != "other-whole"
    if event == "validate":
        return pending == "pending" or validated == "validated"
    return False


REFUSAL_PAIRS = tuple(p for p in PAIRS if is_refusal(*p))


def path_to(start: str, goal: str) -> list[str] | None:
    """The shortest list of events from ``start`` to ``goal`` over EDGES (None: no path)."""
    from collections import deque

    seen, queue = {start: []}, deque([start])  # type: dict[str, list[str]], Any
    while queue:
        s = queue.popleft()
        if s == goal:
            return seen[s]
        for event, nxt in EDGES.get(s, {}).items():
            if nxt not in seen:
                seen[nxt] = [*seen[s], event]
                queue.append(nxt)
    return None


class Walker:
    """Reaches each wanted (state, event) pair: plans a shortest path to the state, fires the event;
    starts a fresh device when no path leads there (or the device wandered off). ``new_device``
    makes a device; ``close_device`` disposes of one."""

    def __init__(self, new_device: Any, close_device: Any, *, max_events: int = 2000, log: Any = None) -> None:
        self.new_device, self.close_device = new_device, close_device
        self.dev: ModelDevice | None = None
        self.covered: Counter[tuple[str, str]] = Counter()
        self.max_events = max_events
        self.events = 0
        self.devices = 0
        self.failures: list[tuple[str, str, str]] = []  # (state, event, the violation's message)
        self.say = log or (lambda line: None)

    def _fire(self, event: str) -> str:
        """Fire ``event``; a violation is recorded (the pair counts as reached: it was) and the
        device is replaced by a fresh one, so one failure does not hide the pairs after it."""
        assert self.dev is not None
        self.events += 1
        state = self.dev.abstract_state()
        try:
            fire(self.dev, event)
            self.dev.check()
        except ModelViolation as e:
            self.failures.append((state, event, str(e)))
            self.say(f"  FAILED: {state} x {event}: {str(e).splitlines()[0]}")
            self.covered[(state, event)] += 1
            self.dev.events.clear()
            self._fresh()
            return state
        self.covered[(state, event)] += 1
        return state

    def _fresh(self) -> None:
        if self.dev is not None:
            self.dev.events.clear()  # counted by _fire
            self.close_device(self.dev)
        self.dev = self.new_device()
        self.devices += 1

    def walk(self, pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """Fire every pair in ``pairs``; returns the pairs it could not reach."""
        todo = [p for p in pairs]
        failed_paths: Counter[tuple[str, str]] = Counter()
        try:
            while todo and self.events < self.max_events:
                if self.dev is None:
                    self._fresh()
                assert self.dev is not None
                here = self.dev.abstract_state()
                # a pair in the state we are in, else the nearest state with one
                mine = [p for p in todo if p[0] == here]
                if mine:
                    pair = mine[0]
                    self.say(f"  {here:<38} {pair[1]}")
                    self._fire(pair[1])
                    todo.remove(pair)
                    continue
                routes = [(path_to(here, s), s) for s in {p[0] for p in todo}]
                routes = [(r, s) for r, s in routes if r is not None and failed_paths[(here, s)] < 2]
                if not routes:
                    if here == FRESH:  # nothing leads to what is left
                        break
                    self._fresh()
                    continue
                route, goal = min(routes, key=lambda rs: len(rs[0]))
                failed_paths[(here, goal)] += 1
                for event in route:
                    self.say(f"  {self.dev.abstract_state():<38} {event} (towards {goal})")
                    pair = (self.dev.abstract_state(), event)
                    self._fire(event)
                    if pair in todo:
                        todo.remove(pair)
                    if self.dev.abstract_state() == goal:
                        break
        finally:
            if self.dev is not None:
                self.dev.events.clear()
        return [p for p in pairs if p not in self.covered]

    def close(self) -> None:
        if self.dev is not None:
            self.close_device(self.dev)
            self.dev = None


def coverage_table(covered: Counter[tuple[str, str]], wanted: tuple[tuple[str, str], ...] = PAIRS) -> list[str]:
    """The (state, event) table: a count, '.' for a wanted pair not reached, 'x' for an impossible
    one (listed below the table with its reason), '!' for a pair reached that was thought impossible."""
    states = list(STATES)
    width = max(len(s) for s in states)
    cols = [e.replace("bad-upload:", "bad:").replace("broken-app:", "app:")[:13] for e in EVENTS]
    lines = [f"{'state':<{width}}  " + " ".join(f"{c:>13}" for c in cols)]
    for s in states:
        cells = []
        for e in EVENTS:
            n = covered.get((s, e), 0)
            if impossible(s, e):
                cells.append("!" + str(n) if n else "x")
            else:
                cells.append(str(n) if n else ".")
        lines.append(f"{s:<{width}}  " + " ".join(f"{c:>13}" for c in cells))
    reached = sum(1 for p in PAIRS if covered.get(p))
    lines.append(f"reached {reached} of {len(PAIRS)} possible pairs ({len(REACHABLE)} states x {len(EVENTS)} events); "
                 f"wanted this run: {len(wanted)}, reached {sum(1 for p in wanted if covered.get(p))}")  # fmt: skip
    reasons: dict[str, list[str]] = {}
    for (s, e), why in IMPOSSIBLE.items():
        reasons.setdefault(why, []).append(s if e == "*" else f"{s} x {e}")
    lines.append("impossible (x), with the reason:")
    for why, where in reasons.items():
        lines.append(f"  {', '.join(where)}: {why}")
    return lines
