"""Device commands over SSH exec: ``status [--json]``, ``logs [-n N] [-f]``, ``reboot``,
``revert``, ``validate``."""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any

import anyio
import asyncssh

from sshfwup import __version__
from sshfwup.boot.bootenv import BootEnvError
from sshfwup.device import Device
from sshfwup.supervisor.errors import SupervisorError
from sshfwup.update import door
from sshfwup.update.lock import DeviceBusy
from sshfwup.update.update import EXIT_FAILED, EXIT_OK, Uploader

log = logging.getLogger(__name__)

__all__ = ["COMMANDS", "NAMES", "Command", "LogsRequest", "UsageError", "parse_logs", "render_status", "run", "status"]


@dataclass(frozen=True)
class Command:
    """A device command. ``changes_state``: it changes what the device runs or boots, so it goes
    through the one door (sshfwup/update/door.py); tests/update/test_door.py holds every such
    command to that, and every other one to changing nothing."""

    name: str
    usage: str
    changes_state: bool


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("status", "status [--json]", changes_state=False),
        Command("logs", "logs [-n N] [-f]", changes_state=False),
        Command("reboot", "reboot [--force]", changes_state=True),
        Command("revert", "revert", changes_state=True),
        Command("validate", "validate", changes_state=True),
    )
}
NAMES = tuple(c.usage for c in COMMANDS.values())
FORCED_REBOOT_CUTS = (
    "`reboot --force` reboots now: an update in progress is cut as by a power cut (the device boots "
    "what its boot state names at that moment)"
)
DEFAULT_LOG_LINES = 100


class UsageError(ValueError):
    """A device command was given arguments it does not take; the message says what it takes."""


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
        "boot_contract": boot.contract if boot else None,
        "trial_boot": boot.trial if boot else None,  # the bootloader falls back unless it validates
        "boot_warnings": list(boot.warnings) if boot else [],
        "pending_reboot": bool(boot and boot.active and root and boot.active != root),
        # state: "incomplete" (an upload was cut or failed after fwup began writing it: it is no
        # longer the firmware its version names), "rolled-back" (it failed), or None (whole)
        "slots": {s: {"version": boot.version(s), "uuid": boot.slots[s].uuid, "state": boot.slots[s].state}
                  for s in ("a", "b")} if boot else {},  # fmt: skip
        "running_uuid": boot.slots[root].uuid if boot and root in boot.slots else None,  # what a delta patch needs
        "boot_env_error": env_error,
        # what `sshfwup firmware diff --running` needs to apply the device's rules (update/rules.py)
        "update_rules": _update_rules(device),
        "app": None,
        "last_update": device.last_outcome,  # (the supervisor's own, when newer: _app_state)
        "update_in_progress": device.lock.busy(),
        "update": None,
        "rebooting": device.reboot_requested.reason if device.reboot_requested else None,
        "server": {
            "version": __version__,
            "pid": device.server_pid,  # the supervisor: the service's main process
            "front_pid": os.getpid(),  # the SSH front answering (restarted at once when it dies)
            "instance": device.instance,
            "uptime": round(time.time() - device.started, 1),
        },
    }
    progress = device.update_progress()
    if progress is not None:
        out["update"] = progress.to_json()
    out.update(await _app_state(device))
    if device.journal is not None:
        out["journal"] = device.journal.summary()
        out["journal_error"] = device.journal.error
    return out


async def _app_state(device: Device) -> dict[str, Any]:
    """What the supervisor says of the app (it owns it: another process), and of the last update
    when it recorded an ending itself since (a validation, a crash-loop rollback)."""
    out: dict[str, Any] = {"app": None, "app_down": None, "app_last_exit": None}
    if device.app is None:
        return out
    try:
        state = await device.app.state()
    except SupervisorError as e:
        out["app_down"] = {"reason": f"unknown: {e}", "for": 0.0, "next_attempt_in": None}
        return out
    out.update({k: state.get(k) for k in ("app", "app_down", "app_last_exit")})
    theirs = state.get("last_outcome")
    if theirs and (device.last_outcome is None or float(state.get("last_outcome_at") or 0) > device.last_outcome_at):
        out["last_update"] = theirs
    if state.get("rebooting") and not device.reboot_requested:
        out["rebooting"] = state["rebooting"]
    return out


def _update_rules(device: Device) -> dict[str, Any]:
    """``[update] allow_downgrade`` and the public keys fwup requires a signature by (base64, as
    in fwup's key files: public keys, nothing secret)."""
    import base64

    from sshfwup.firmware.errors import FirmwareError
    from sshfwup.firmware.keys import load_public_key

    keys: list[str | None] = []
    for path in device.config.fwup.public_keys:
        try:
            keys.append(base64.b64encode(load_public_key(path)).decode())
        except (OSError, FirmwareError) as e:
            log.warning("status: cannot read the public key %s: %s", path, e)
            keys.append(None)  # configured, unreadable: fwup refuses every upload
    return {
        "allow_downgrade": device.config.update.allow_downgrade,
        "signed_only": bool(device.config.fwup.public_keys),
        "public_keys": keys,
    }


def render_status(s: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [("running root", f"slot {s['running_root'] or '?'}")]
    if s.get("boot_env_error"):
        rows.append(("boot env", f"unreadable: {s['boot_env_error']}"))
    else:
        trial = " (not validated; on trial: the bootloader falls back unless it validates)" if s.get("trial_boot") else ""
        rows.append(("next boot", f"slot {s['active'] or '?'}" + (trial or ("" if s["validated"] else " (not validated)"))))
        for slot, info in s["slots"].items():
            rows.append((f"slot {slot}", (info["version"] or "(empty)") + _SLOT_STATES.get(info.get("state") or "", "")))
        for warning in s.get("boot_warnings") or ():
            rows.append(("WARNING", warning))
    if s.get("journal_error"):
        rows.append(("journal", f"NOT WRITTEN ({s['journal_error']}): updates work, crash recovery relies on the boot env"))
    if s["pending_reboot"]:
        rows.append(("pending reboot", f"yes: slot {s['active']} runs after the next reboot (ssh <device> reboot)"))
    app = s.get("app")
    down = s.get("app_down")
    if app and app.get("state", "running") != "exited":
        text = f"{app['version']} from slot {app['slot']}, pid {app['pid']}, up {app['uptime']:.0f} s"
        text += f", {app['restarts']} restarts" if app.get("restarts") else ""
        rows.append(("app", text + (" (starting)" if app.get("state") == "starting" else "")))
    elif down:
        text = f"NOT RUNNING for {down['for']:.0f} s: {down['reason']}"
        if down.get("next_attempt_in") is not None:
            text += f"; next start in {down['next_attempt_in']:.0f} s"
        rows.append(("app", text))
    else:
        rows.append(("app", "not running"))
    rows += _exit_rows(s.get("app_last_exit"), output=not app or app.get("state") == "exited" or bool(down))
    last = s.get("last_update")
    if last:
        rows.append(("last update", f"{'ok' if last.get('ok') else 'FAILED'}: {last.get('verdict')}"))
        elsewhere = _not_running_what_it_installed(s)
        if elsewhere:
            rows.append(("", elsewhere))
    update = s.get("update")
    if update:
        rows += _update_rows(update)
    elif s.get("update_in_progress"):
        rows.append(("update", "in progress (the update lock is held outside this server)"))
    if s.get("rebooting"):
        rows.append(("rebooting", s["rebooting"]))
    return "".join(f"{label + ':' if label else '':<16}{value}\n" for label, value in rows)


def _not_running_what_it_installed(s: dict[str, Any]) -> str | None:
    """A successful last update whose slot is not the one running (and no reboot into it is
    pending): the device fell back, was reverted, or lost its boot env since — its "ok" is about
    another slot than the one serving now."""
    to_slot = (s.get("journal") or {}).get("to_slot")
    root = s.get("running_root")
    if not (s.get("last_update") or {}).get("ok") or not to_slot or not root or to_slot == root:
        return None
    if s.get("pending_reboot") and s.get("active") == to_slot:
        return None
    return (f"(that update installed slot {to_slot}; the device runs slot {root}: it fell back, was reverted or "
            f"lost its boot env since)")  # fmt: skip


_SLOT_STATES = {
    "incomplete": " (INCOMPLETE: an upload to it was cut or failed after fwup began on it; it does not boot and "
                  "cannot be reverted to until a new upload completes)",
    "rolled-back": " (rolled back: it failed; it does not boot and cannot be reverted to until a new upload completes)",
}


def _exit_rows(last: dict[str, Any] | None, *, output: bool) -> list[tuple[str, str]]:
    """``last app exit:`` (how and when), and while no version runs its last lines of output."""
    if not last:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
    ago = max(0, round(time.time() - last["at"]))
    rows = [("last app exit", f"{last['reason']} (pid {last['pid']}), {when} ({ago} s ago)")]
    if output:
        lines = last.get("output") or ["(no output)"]
        rows += [("app output" if i == 0 else "", line) for i, line in enumerate(lines[-10:])]
    return rows


def _update_rows(u: dict[str, Any]) -> list[tuple[str, str]]:
    """``update:`` rows: stage, who and how, then versions, bytes and fwup's percentage."""
    head = f"{u['stage']} ({u['transport']} from {u['uploader']}, {u['elapsed']:.0f} s)"
    target = u["to_version"] or "?"
    if u.get("to_slot"):
        target += f" (slot {u['to_slot']})"
    source = (u["from_version"] or "?") + (f" (slot {u['from_slot']})" if u.get("from_slot") else "")
    detail = f"{source} → {target}; {_megabytes(u['received'])} received"
    if u.get("percent") is not None:
        detail += f"; fwup {u['percent']}%"
    return [("update", head), ("", detail)]


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


async def run(process: asyncssh.SSHServerProcess, device: Device, who: Uploader, command: str | None = None) -> int:
    """Run ``command`` (default: what the client asked; the server passes a key's forced command)."""
    command = process.command if command is None else command
    try:
        argv = shlex.split(command or "")
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
    if name == "logs":
        try:
            request = parse_logs(argv[1:], limit=device.logs.max_lines)
        except UsageError as e:
            return fail(str(e))
        return await _logs(process, device, request, who)
    if name == "reboot" and argv[1:] in ([], ["--force"]):
        if argv[1:] == ["--force"]:
            holder = door.force_reboot_past(device, str(who))
            say(f"rebooting (forced past {holder.describe()})\n" if holder else "rebooting\n")
            device.request_reboot(f"forced by {who}")
            return EXIT_OK
        try:
            async with door.state_change(device, f"a reboot requested by {who}"):
                log.warning("reboot requested by %s", who)
                device.request_reboot(f"requested by {who}")
        except DeviceBusy as e:
            return fail(f"not rebooting: {e}; {FORCED_REBOOT_CUTS}")
        say("rebooting\n")
        return EXIT_OK
    if name in ("revert", "validate") and len(argv) == 1:
        from sshfwup.update import pipeline

        try:
            text = await (pipeline.revert(device, who) if name == "revert" else pipeline.validate(device, who))
        except pipeline.PipelineError as e:
            return fail(str(e))
        say(text + "\n")
        return EXIT_OK
    log.warning("refused command %r from %s", command, who)
    return fail(f"command not allowed: {command!r}; allowed: {', '.join(NAMES)}, and uploads (scp -t)")



# --- logs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogsRequest:
    """``logs [-n N] [-f]``: the last ``lines`` lines, then (``follow``) new ones as they come."""

    lines: int = DEFAULT_LOG_LINES
    follow: bool = False


def parse_logs(args: list[str], *, limit: int) -> LogsRequest:
    """``-n N`` / ``-nN`` / ``--lines N`` (0..limit), ``-f`` / ``--follow``, in any order."""
    usage = f"usage: logs [-n N] [-f]  (N from 0 to {limit}, default {min(DEFAULT_LOG_LINES, limit)})"
    lines, follow = min(DEFAULT_LOG_LINES, limit), False
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg in ("-f", "--follow"):
            follow = True
            continue
        if arg in ("-n", "--lines"):
            if not rest:
                raise UsageError(f"logs: {arg} needs a number; {usage}")
            value = rest.pop(0)
        elif arg.startswith("-n") and len(arg) > 2:
            value = arg[2:]
        else:
            raise UsageError(f"logs: unknown argument {arg!r}; {usage}")
        if not value.isdigit() or int(value) > limit:
            raise UsageError(f"logs: -n takes a number from 0 to {limit}, not {value!r}; {usage}")
        lines = int(value)
    return LogsRequest(lines, follow)


async def _logs(process: asyncssh.SSHServerProcess, device: Device, request: LogsRequest, who: Uploader) -> int:
    ring = device.logs
    last = ring.last_seq  # the position the tail ends at: following starts right after it
    tail = [line for line in ring.tail(request.lines) if line.seq <= last]
    await _send(process, "".join(line.text + "\n" for line in tail))
    if not request.follow:
        return EXIT_OK

    async def follow() -> None:
        async for item in ring.follow(last):
            if isinstance(item, int):
                text = f"-- {item} line{'s' if item != 1 else ''} skipped: this connection fell behind the log --\n"
            else:
                text = item.text + "\n"
            await _send(process, text)

    # Until the client leaves (Ctrl-C closes the channel); stdin's EOF (ssh -n) is not leaving.
    log.info("%s follows the log", who)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_cancel_when_closed, process.channel, tg.cancel_scope)
        try:
            await follow()
        except (OSError, asyncssh.Error, BrokenPipeError):
            pass  # the channel went away while we wrote
        tg.cancel_scope.cancel()
    log.info("%s stopped following the log", who)
    return EXIT_OK


async def _cancel_when_closed(channel: asyncssh.SSHServerChannel, scope: anyio.CancelScope) -> None:
    await channel.wait_closed()
    scope.cancel()


async def _send(process: asyncssh.SSHServerProcess, text: str) -> None:
    if text:
        process.stdout.write(text.encode("utf-8", errors="replace"))
        await process.stdout.drain()  # the client's window: a slow reader slows this follower only
