"""Device commands over SSH exec: ``status [--json]``, ``reboot``, ``revert``, ``validate``."""

from __future__ import annotations

import json
import logging
import shlex
import time
from typing import Any

import asyncssh

from .bootenv import BootEnvError
from .device import Device
from .update import EXIT_FAILED, EXIT_OK, Uploader

log = logging.getLogger(__name__)

__all__ = ["NAMES", "run", "status"]

NAMES = ("status", "status --json", "reboot", "revert", "validate")


async def status(device: Device) -> dict[str, Any]:
    """Everything an operator asks first, in one dict (also the ``--json`` form)."""
    root = device.running_root()
    try:
        boot = await device.boot_state()
        env_error = None
    except BootEnvError as e:
        boot, env_error = None, str(e)
    out: dict[str, Any] = {
        "running_root": root,
        "active": boot.active if boot else None,
        "validated": boot.validated if boot else None,
        "pending_reboot": bool(boot and boot.active and root and boot.active != root),
        "slots": {s: {"version": boot.version(s), "uuid": boot.slots[s].uuid} for s in ("a", "b")} if boot else {},
        "running_uuid": boot.slots[root].uuid if boot and root in boot.slots else None,  # what a delta patch needs
        "boot_env_error": env_error,
        "app": None,
        "last_update": device.last_outcome,
        "update_in_progress": device.lock.busy(),
    }
    sup = device.supervisor
    if sup is not None and sup.current is not None:
        inst = sup.current
        out["app"] = {
            "pid": inst.pid,
            "version": inst.source.version,
            "slot": inst.source.slot,
            "root": str(inst.source.root),
            "uptime": round(time.monotonic() - inst.started_at, 1),
            "restarts": getattr(inst, "restarts", 0),
        }
    if device.journal is not None:
        out["journal"] = device.journal.summary()
    return out


def render_status(s: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [("running root", f"slot {s['running_root'] or '?'}")]
    if s.get("boot_env_error"):
        rows.append(("boot env", f"unreadable: {s['boot_env_error']}"))
    else:
        rows.append(("next boot", f"slot {s['active'] or '?'}" + ("" if s["validated"] else " (not validated)")))
        for slot, info in s["slots"].items():
            rows.append((f"slot {slot}", info["version"] or "(empty)"))
    if s["pending_reboot"]:
        rows.append(("pending reboot", f"yes: slot {s['active']} runs after the next reboot (ssh <device> reboot)"))
    app = s.get("app")
    if app:
        text = f"{app['version']} from slot {app['slot']}, pid {app['pid']}, up {app['uptime']:.0f} s"
        rows.append(("app", text + (f", {app['restarts']} restarts" if app.get("restarts") else "")))
    else:
        rows.append(("app", "not running"))
    last = s.get("last_update")
    if last:
        rows.append(("last update", f"{'ok' if last.get('ok') else 'FAILED'}: {last.get('verdict')}"))
    if s.get("update_in_progress"):
        rows.append(("update", "in progress"))
    return "".join(f"{label + ':':<16}{value}\n" for label, value in rows)


async def run(process: asyncssh.SSHServerProcess, device: Device, who: Uploader) -> int:
    try:
        argv = shlex.split(process.command or "")
    except ValueError:
        argv = []
    name = argv[0] if argv else ""

    def say(text: str) -> None:
        process.stdout.write(text.encode("utf-8"))

    def fail(text: str) -> int:
        process.stderr.write(f"Error: {text}\n".encode("utf-8"))
        return EXIT_FAILED

    if name == "status" and argv[1:] in ([], ["--json"]):
        s = await status(device)
        say(json.dumps(s, indent=2, sort_keys=True) + "\n" if argv[1:] == ["--json"] else render_status(s))
        return EXIT_OK
    if name == "reboot" and len(argv) == 1:
        log.warning("reboot requested by %s", who)
        say("rebooting\n")
        device.request_reboot(f"requested by {who}")
        return EXIT_OK
    if name in ("revert", "validate") and len(argv) == 1:
        if device.lock.busy():
            return fail("an update is in progress; try again when it has finished")
        from . import pipeline

        try:
            text = await (pipeline.revert(device, who) if name == "revert" else pipeline.validate(device, who))
        except pipeline.PipelineError as e:
            return fail(str(e))
        say(text + "\n")
        return EXIT_OK
    log.warning("refused command %r from %s", process.command, who)
    return fail(f"command not allowed: {process.command!r}; allowed: {', '.join(NAMES)}, and uploads (scp -t)")

