"""The model's events: uploads (good, bad, cut, slow, broken apps, the same firmware), power cuts,
reboots, validate and revert; each drives the device and waits until it is at rest again."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from sshfwup.system import procs
from sshfwup.update.journal import ACTIVE_STAGES

from .changes import Result, check_change
from .device import ALLOWED_REFUSALS, ModelledDevice, ModelViolation, garbage, snapshot, upload_in_background


def _out(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode("utf-8", errors="replace")


def _serves(dev: ModelledDevice, version: str, text: str, boots: int, what: str) -> None:
    """After an exit status 0: the new version serves, hot or after the reboot it announced."""
    if "rebooting into" in text:
        dev.wait_reboot(boots)
    else:
        dev.settle()
    served = dev.status()["app"]["version"]
    if served != version:
        raise ModelViolation(f"{what}: exit 0 but the app serves {served}, not {version}\n{text}")


def _refused_cleanly(dev: ModelledDevice, result: subprocess.CompletedProcess[bytes], before: dict[str, str], what: str) -> None:
    text = _out(result)
    if result.returncode != 1:
        raise ModelViolation(f"{what}: exit status {result.returncode}, expected 1\n{text}")
    now, was = dev.spec.view(dev.env()), dev.spec.view(before)
    if now.active != was.active:
        raise ModelViolation(f"{what} changed the slot that boots next: {was.active} -> {now.active}\n{text}")
    if was.validated and not now.validated:
        raise ModelViolation(f"{what} un-validated the running firmware\n{text}")


def _good_upload(dev: ModelledDevice, data: bytes, version: str, what: str) -> Result:
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


def _fixed(dev: ModelledDevice, name: str, **kwargs: Any) -> bytes:
    if name not in dev.fixed:
        dev.fixed[name] = dev.firmwares.make(**kwargs)[1].read_bytes()
    return dev.fixed[name]


def ev_hot_upload(dev: ModelledDevice, param: Any = None) -> Result:
    version, fw = dev.firmwares.make()
    return _good_upload(dev, fw.read_bytes(), version, "hot upload")


def ev_reboot_upload(dev: ModelledDevice, param: Any = None) -> Result:
    version, fw = dev.firmwares.make(changes=("system-file",))
    return _good_upload(dev, fw.read_bytes(), version, "reboot-requiring upload")


def ev_bad_upload(kind: str) -> Any:
    def run(dev: ModelledDevice, param: Any = None) -> Result:
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


def ev_cut_upload(dev: ModelledDevice, param: Any = None) -> Result:
    fraction = 0.5 if param is None else float(param)
    before = dev.env()
    data = _fixed(dev, "filler", filler=400 * 1024)
    result = dev.upload(data[: int(len(data) * fraction)])
    _refused_cleanly(dev, result, before, f"upload cut at {fraction:.4f}")
    dev.settle()
    return Result(result.returncode, _out(result))


def ev_slow_tail_upload(dev: ModelledDevice, param: Any = None) -> Result:
    version, fw = dev.firmwares.make()
    data = fw.read_bytes()
    # the uploader pauses before its last bytes; fwup's verdict must still stand
    argv = dev.ssh_argv("fwup", subsystem=True)
    before = dev.env()
    boots = dev.state().boot_count
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data[:-100])
    proc.stdin.flush()
    time.sleep(0.5)
    proc.stdin.write(data[-100:])
    stdout, stderr = proc.communicate(timeout=dev.UPLOAD_TIMEOUT)
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
    def run(dev: ModelledDevice, param: Any = None) -> Result:
        behavior = {"never_ready": True} if kind == "never_ready" else {"crash_after": 2.5}
        version, fw = dev.firmwares.make(app_behavior=behavior)
        boots = dev.state().boot_count
        result = dev.upload(fw.read_bytes())
        text = _out(result)
        if result.returncode == 0 and "rebooting into" in text:
            dev.wait_reboot(boots)
            if kind == "never_ready":
                dev.wait_verdict(boots + 1)  # its app never gets ready: the device falls back, rebooting
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


def ev_power_cut(dev: ModelledDevice, param: Any = None) -> Result:
    delay = dev.power_cut_delay() if param is None else float(param)
    _, fw = dev.firmwares.make()
    boots = dev.state().boot_count
    thread = upload_in_background(dev, fw.read_bytes())
    time.sleep(delay)
    cut = dev.state().boot_count  # the upload may have rebooted the device already
    dev.power_cut()
    dev.settle(boot=max(boots, cut) + 1)
    thread.join(timeout=60)
    return Result(None)


def ev_front_killed(dev: ModelledDevice, param: Any = None) -> Result:
    """The rule "front killed": SIGKILL of the SSH front at any instant of an upload (0–2.5 s in)
    restarts nothing but the front — the supervisor and the boot stay (unless the upload had
    already asked for its reboot) — and leaves no update half-way: once settled, the journal is at
    an ending and the lock is free. What it may change of the env and the slots is checked as
    for any upload that failed (check_change), or as a completed one when it finished first."""
    delay = 1.2 if param is None else float(param)
    _, fw = dev.firmwares.make()
    state = dev.state()
    boots, server = state.boot_count, state.server_pid
    thread = upload_in_background(dev, fw.read_bytes())
    time.sleep(delay)
    front = procs.ssh_front(server) if server else None
    rebooting = dev.state().boot_count != boots or dev.status().get("rebooting")
    if front is not None and not rebooting:
        try:
            os.kill(front, signal.SIGKILL)
        except ProcessLookupError:
            pass
    thread.join(timeout=dev.UPLOAD_TIMEOUT)
    dev.settle()
    after = dev.state()
    if not rebooting and after.boot_count == boots and after.server_pid != server:
        raise ModelViolation(f"killing the SSH front (pid {front}) restarted the supervisor (pid {server} → {after.server_pid})")
    status = dev.status()
    stage = (status.get("journal") or {}).get("stage")
    if stage in ACTIVE_STAGES or status["update_in_progress"]:
        raise ModelViolation(f"after the SSH front was killed the update stays half-way: journal at '{stage}', "
                             f"lock {'held' if status['update_in_progress'] else 'free'}")  # fmt: skip
    return Result(None)


def ev_reboot(dev: ModelledDevice, param: Any = None) -> Result:
    boots = dev.state().boot_count
    result = dev.ssh("reboot")
    if result.returncode != 0:
        raise ModelViolation(f"reboot refused: {_out(result)}")
    dev.wait_reboot(boots)
    return Result(None)


def ev_validate(dev: ModelledDevice, param: Any = None) -> Result:
    result = dev.ssh("validate")
    if result.returncode not in (0, 1):
        raise ModelViolation(f"validate: exit status {result.returncode}: {_out(result)}")
    return Result(result.returncode, _out(result))


def ev_revert(dev: ModelledDevice, param: Any = None) -> Result:
    result = dev.ssh("revert")
    if result.returncode not in (0, 1):
        raise ModelViolation(f"revert: exit status {result.returncode}: {_out(result)}")
    dev.settle()
    return Result(result.returncode, _out(result))


def ev_same_upload(dev: ModelledDevice, param: Any = None) -> Result:
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
    "front-killed": ev_front_killed,
}
#: What both modelled devices run (the walk's pairs). Not "front-killed": the QEMU device's front
#: runs inside the guest, out of this host's reach; the simulator's state machine fires it.
EVENTS = tuple(e for e in RUNNERS if e != "front-killed")


def fire(dev: ModelledDevice, event: str, param: Any = None) -> str:
    """One event: recorded against the abstract state it starts in, then checked for what it
    changed. Returns the state it started in. (The invariants at rest: ``dev.check()``.)"""
    before = snapshot(dev)
    state = dev.abstract_state(before)
    dev.record(event, state)
    result = RUNNERS[event](dev, param)
    check_change(dev, event, state, before, snapshot(dev), result)
    return state
