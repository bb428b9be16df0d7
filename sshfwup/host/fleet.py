"""One device's firmware update as a fleet tool runs it: predict, refuse early, upload, confirm.

The Ansible collection (``ansible_collections/sshfwup/device``) runs this on the controller for
each device: devices refuse shells, so nothing is copied to them; this module speaks sshfwup's
SSH protocol to the device with :mod:`sshfwup.host.client`.

- :func:`plan_update` asks the device what it runs (``status --json``) and predicts the
  verdict for ``firmware``: ``unchanged`` (already installed: running, or hot-swapped in and
  waiting for its reboot), ``hot``, ``reboot``, ``unknown`` (the running firmware's ``.fw`` is
  not among the releases, so its manifest cannot be compared), or a refusal the device would
  answer (busy: an update in progress, a reboot on its way; then every rule it applies before
  fwup, by the device's own function as ``firmware diff --running`` applies it: a reboot
  pending, firmware not validated yet, a signature it would not accept, a downgrade, a delta
  patch for another firmware). The verdict comes from :func:`sshfwup.host.firmware.compute_diff` — ``inspect.decide``, the
  same rule the device applies — on the running release and the new one.
- :func:`reboot_device` reboots a device (by default only one whose reboot is pending, after a
  hot swap) and follows it until the firmware it boots is validated, or it fell back.
- :func:`update_device` does it: with ``check`` only the plan; without ``allow_reboot`` it
  fails before sending a byte when the verdict is not a proven hot swap; otherwise it uploads
  with :func:`sshfwup.host.client.upload` (``wait`` follows the reboot and validation) and reports
  what the device did, bytes sent and durations.

Host side only: ``sshfwup serve`` never imports this.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import asyncssh

from .client import (
    EXIT_LOST,
    EXIT_OK,
    KnownHosts,
    RebootWatch,
    Target,
    check_identities,
    clean_text,
    connect_options,
    describe_connect_error,
    follow_reboot,
    upload,
)
from .device_check import UnreadableFirmware, device_check
from .firmware_remote import RemoteError, RemoteUnreachable, fetch_status

__all__ = [
    "DeviceAddress",
    "DeviceUnreachable",
    "FleetError",
    "Plan",
    "UpdateResult",
    "RebootResult",
    "check_request",
    "plan_update",
    "reboot_device",
    "update_device",
]

HOT, REBOOT, UNCHANGED, UNKNOWN = "hot", "reboot", "unchanged", "unknown"
OUTPUT_LINES = 60  # the device's last lines kept in a result
STATUS_TIMEOUT = 30.0


class FleetError(Exception):
    """The update cannot go ahead, or did not succeed; the message says why, for an operator."""

    def __init__(self, message: str, result: "UpdateResult | None" = None) -> None:
        super().__init__(message)
        self.result = result


class DeviceUnreachable(FleetError):
    """No SSH session with the device (refused, timed out, host key or login refused)."""


@dataclass(frozen=True)
class DeviceAddress:
    host: str
    port: int = 22
    username: str | None = None
    identities: tuple[str, ...] = ()
    known_hosts: KnownHosts = ()  # () ~/.ssh/known_hosts, a file, or None: accept any host key


@dataclass(frozen=True)
class Firmware:
    path: Path
    version: str | None
    uuid: str


@dataclass(frozen=True)
class Plan:
    verdict: str  # hot | reboot | unchanged | unknown
    from_version: str | None
    to_version: str | None
    reasons: tuple[str, ...] = ()
    reboot_pending: bool = False  # the device waits for a reboot into the target firmware
    refusal: str | None = None  # why the device would refuse the upload (it is not sent)
    running_file: str | None = None  # the release the prediction compared with


@dataclass(frozen=True)
class UpdateResult:
    changed: bool
    verdict: str  # what happened (or, in check mode, what would): hot | reboot | unchanged | unknown
    predicted: str
    from_version: str | None
    to_version: str | None
    reasons: tuple[str, ...] = ()
    reboot_pending: bool = False
    validated: bool | None = None
    bytes_sent: int = 0
    durations: dict[str, float] = field(default_factory=dict)
    device_output: tuple[str, ...] = ()
    msg: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"], out["device_output"] = list(self.reasons), list(self.device_output)
        out["hot"], out["reboot"] = self.verdict == HOT, self.verdict == REBOOT
        return out


# --- checking the request -------------------------------------------------------------------------


def check_request(
    firmware: Path,
    *,
    port: int,
    identities: tuple[str, ...] = (),
    timeout: float = 300.0,
    releases: Path | None = None,
    delta_from: Path | None = None,
    known_hosts: KnownHosts = (),
) -> str | None:
    """Why the request cannot be carried out (before contacting the device), or None."""
    if firmware.is_dir():
        return f"firmware {firmware}: is a directory; give the firmware file (FILE.fw)"
    if not firmware.is_file():
        return f"firmware {firmware}: no such file"
    if not 0 < port < 65536:
        return f"port {port}: a port is 1..65535"
    if not timeout > 0:
        return f"timeout {timeout:g}: must be more than 0 seconds"
    for name, directory in (("releases", releases), ("delta_from", delta_from)):
        if directory is not None and not directory.is_dir():
            return f"{name} {directory}: not a directory"
    if isinstance(known_hosts, str) and not Path(known_hosts).is_file():
        return f"known_hosts {known_hosts}: no such file"
    return check_identities(list(identities))


def read_firmware_head(path: Path) -> Firmware:
    from sshfwup.firmware.errors import FirmwareError
    from sshfwup.firmware.zipstream import ZipStream
    from sshfwup.firmware.archive import read_head

    try:
        with path.open("rb") as f:
            head = read_head(ZipStream(f.read), source=str(path))
    except OSError as e:
        raise FleetError(f"firmware {path}: cannot read it: {e.strerror or e}") from None
    except (FirmwareError, ValueError) as e:
        raise FleetError(f"firmware {path}: not a usable .fw: {e}") from None
    if not head.uuid:
        raise FleetError(f"firmware {path}: its meta.conf has no uuid, so the device cannot be compared with it")
    return Firmware(path, head.version or None, head.uuid)


# --- predicting ----------------------------------------------------------------------------------


def _slot(status: dict[str, Any], slot: object) -> dict[str, Any]:
    slots = status.get("slots")
    info = slots.get(slot) if isinstance(slots, dict) and isinstance(slot, str) else None
    return info if isinstance(info, dict) else {}


def installed(status: dict[str, Any], target_uuid: str) -> tuple[bool, bool]:
    """(the target firmware is installed and serving, it waits for a reboot to become the root).

    Running root = target: installed. A hot swap into the target: the slot that boots next holds
    it and the app serves from that slot — installed, reboot pending (the device would refuse
    another upload until it reboots, so a second roll-out must not send it again).
    """
    if status.get("running_uuid") == target_uuid:
        return True, False
    active = status.get("active")
    app = status.get("app") if isinstance(status.get("app"), dict) else {}
    if (status.get("pending_reboot") and _slot(status, active).get("uuid") == target_uuid
            and app.get("slot") == active):  # fmt: skip
        return True, True
    return False, False


def refusal(status: dict[str, Any], host: str, firmware: Path | None = None) -> str | None:
    """Why the device would refuse an upload of ``firmware`` now, or None: busy (the update lock,
    a reboot on its way, an unreadable boot env), then every rule it applies before fwup — the
    same function the device applies (:mod:`sshfwup.host.device_check`)."""
    if status.get("update_in_progress"):
        return f"{host} is applying an update right now; try again when it has finished"
    if status.get("rebooting"):
        return f"{host} is rebooting ({status['rebooting']})"
    if status.get("boot_env_error"):
        return f"{host} cannot read its boot environment: {status['boot_env_error']}"
    if firmware is None:
        return None
    try:
        judged = device_check(status, host, firmware, None).judgement
    except UnreadableFirmware as e:
        raise FleetError(str(e)) from None
    return f"{host} would refuse it: {judged.refusal}" if judged.refusal else None


def _find_release(releases: Path, uuid: str) -> Path | None:
    from sshfwup.firmware.errors import FirmwareError

    for candidate in sorted(releases.glob("*.fw")):
        try:
            if read_firmware_head(candidate).uuid == uuid:
                return candidate
        except (FleetError, FirmwareError):
            continue
    return None


def predict(status: dict[str, Any], firmware: Firmware, releases: Path | None, host: str) -> Plan:
    """The plan for ``firmware`` on a device that answered ``status``; reads releases (blocking)."""
    running_slot = status.get("running_root")
    from_version = _slot(status, running_slot).get("version")
    now, pending = installed(status, firmware.uuid)
    if now:
        return Plan(UNCHANGED, from_version if not pending else firmware.version, firmware.version,
                    reboot_pending=pending)  # fmt: skip
    refused = refusal(status, host, firmware.path)
    if refused:
        return Plan(UNKNOWN, from_version, firmware.version, refusal=refused)
    running_uuid = status.get("running_uuid")
    if not isinstance(running_uuid, str) or not running_uuid:
        return Plan(UNKNOWN, from_version, firmware.version,
                    reasons=(f"{host} records no firmware uuid for its running slot {running_slot}",))  # fmt: skip
    match = _find_release(releases, running_uuid) if releases is not None else None
    if match is None:
        where = f"in {releases}" if releases is not None else "(no releases directory given)"
        return Plan(UNKNOWN, from_version, firmware.version,
                    reasons=(f"the firmware {host} runs ({from_version or '?'}, uuid {running_uuid}) is not a .fw {where}",))  # fmt: skip
    from .firmware import CommandError, compute_diff

    try:
        diff = compute_diff(match, firmware.path)
    except CommandError as e:
        return Plan(UNKNOWN, from_version, firmware.version, reasons=(f"cannot compare with {match}: {e}",))
    verdict = HOT if diff.verdict.hot else REBOOT
    return Plan(verdict, from_version, firmware.version, reasons=tuple(diff.verdict.reasons), running_file=str(match))


async def device_status(address: DeviceAddress, timeout: float = STATUS_TIMEOUT) -> dict[str, Any]:
    """``status --json``; DeviceUnreachable when no session, FleetError for a useless answer."""
    try:
        return await fetch_status(
            address.host, port=address.port, username=address.username,
            identities=list(address.identities) or None, known_hosts=address.known_hosts, timeout=timeout,
        )  # fmt: skip
    except RemoteUnreachable as e:
        raise DeviceUnreachable(str(e)) from None
    except RemoteError as e:
        raise FleetError(str(e)) from None


async def plan_update(address: DeviceAddress, firmware: Path, releases: Path | None) -> Plan:
    target = read_firmware_head(firmware)
    status = await device_status(address)
    return await anyio.to_thread.run_sync(lambda: predict(status, target, releases, address.host))


# --- updating ------------------------------------------------------------------------------------


class RecordingDisplay:
    """A :class:`sshfwup.host.progress_display.Display` that keeps the device's lines and counts bytes."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bytes_sent = 0
        self.sent_at: float | None = None
        self._began = time.monotonic()

    def start(self, total: int) -> None:
        self._began = time.monotonic()

    def sent(self, n: int) -> None:
        self.bytes_sent += n

    def sent_all(self) -> None:
        self.sent_at = time.monotonic() - self._began

    def fwup(self, percent: int) -> None:
        pass

    def accepted(self) -> None:
        pass

    def line(self, text: str) -> None:
        self.lines.append(text)

    def close(self) -> None:
        pass


def verdict_from_lines(lines: list[str]) -> str | None:
    """What the device said it did, from its own summary lines."""
    for text in reversed(lines):
        if text.startswith("sshfwup: hot reload:"):
            return HOT
        if text.startswith("sshfwup: reboot required") or "rebooting into" in text:
            return REBOOT
        if text.startswith("sshfwup: already running") or "nothing changed" in text:
            return UNCHANGED
    return None


def _failure_line(lines: list[str]) -> str:
    """The device's most telling line about a failure."""
    for text in reversed(lines):
        lowered = text.lower()
        if any(w in lowered for w in ("refused", "rolled back", "rolling back", "failed", "fell back", "error")):
            return text.removeprefix("sshfwup: ")
    return lines[-1].removeprefix("sshfwup: ") if lines else "no output from the device"


async def update_device(
    address: DeviceAddress,
    firmware: Path,
    *,
    releases: Path | None = None,
    delta_from: Path | None = None,
    wait: bool = True,
    timeout: float = 300.0,
    allow_reboot: bool = True,
    check: bool = False,
) -> UpdateResult:
    """Plan, then (unless ``check``) update one device; FleetError/DeviceUnreachable on failure."""
    began = time.monotonic()
    releases = releases or delta_from or firmware.parent
    plan = await plan_update(address, firmware, releases)
    planned = round(time.monotonic() - began, 3)
    base = UpdateResult(
        changed=plan.verdict != UNCHANGED, verdict=plan.verdict, predicted=plan.verdict,
        from_version=plan.from_version, to_version=plan.to_version, reasons=plan.reasons,
        reboot_pending=plan.reboot_pending, durations={"plan": planned, "total": planned},
    )  # fmt: skip
    if plan.refusal:
        raise FleetError(plan.refusal, base)
    if plan.verdict == UNCHANGED:
        note = "; reboot pending" if plan.reboot_pending else ""
        return replace(base, changed=False, msg=f"already running {plan.to_version}{note}; nothing sent")
    if not allow_reboot and plan.verdict != HOT:
        why = "; ".join(plan.reasons) or plan.verdict
        raise FleetError(f"{address.host}: {plan.from_version} → {plan.to_version} would not be a hot swap "
                         f"(allow_reboot is false): {why}; nothing was sent", base)  # fmt: skip
    if check:
        return replace(base, msg=f"would update {plan.from_version} → {plan.to_version}: {plan.verdict}")
    display = RecordingDisplay()
    status = await upload(
        address.host, firmware, port=address.port, username=address.username,
        identities=list(address.identities) or None, known_hosts=address.known_hosts,
        wait=wait, timeout=timeout, display=display, delta_from=delta_from,
    )  # fmt: skip
    total = round(time.monotonic() - began, 3)
    durations = {"plan": planned, "total": total, "update": round(total - planned, 3)}
    if display.sent_at is not None:
        durations["transfer"] = round(display.sent_at, 3)
    done = verdict_from_lines(display.lines)
    result = replace(base, verdict=done or plan.verdict, bytes_sent=display.bytes_sent, durations=durations,
                      device_output=tuple(display.lines[-OUTPUT_LINES:]))  # fmt: skip
    if status == EXIT_LOST and display.bytes_sent == 0:
        raise DeviceUnreachable(_failure_line(display.lines), result)
    if status != EXIT_OK:
        raise FleetError(f"{address.host}: the update failed (exit status {status}): {_failure_line(display.lines)}",
                         result)  # fmt: skip
    return await _confirm(address, result, wait)


async def _confirm(address: DeviceAddress, result: UpdateResult, waited: bool) -> UpdateResult:
    """Read back what the device runs now (after ``wait``: it has booted or swapped)."""
    if result.verdict == UNCHANGED:
        return replace(result, changed=False, msg=f"already running {result.to_version}; nothing changed")
    if not waited:
        return replace(result, msg=f"{result.from_version} → {result.to_version}: {result.verdict} (not waited for)")
    try:
        status = await device_status(address)
    except FleetError as e:
        raise FleetError(f"{address.host}: updated, but its state could not be read back: {e}", result) from None
    app = status.get("app") if isinstance(status.get("app"), dict) else {}
    version = app.get("version")
    if version != result.to_version:
        raise FleetError(f"{address.host}: the update reported success but the app runs {version or 'nothing'}, "
                         f"not {result.to_version}", result)  # fmt: skip
    pending = bool(status.get("pending_reboot"))
    validated = status.get("validated") if isinstance(status.get("validated"), bool) else None
    note = "reboot pending" if pending else ("validated" if validated else "not validated yet")
    return replace(result, reboot_pending=pending, validated=validated,
                    msg=f"{result.from_version} → {result.to_version}: {result.verdict}; {note}")  # fmt: skip


# --- rebooting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RebootResult:
    changed: bool
    from_version: str | None  # what ran before
    to_version: str | None  # what runs now (expected, when not waited for)
    validated: bool | None = None
    durations: dict[str, float] = field(default_factory=dict)
    device_output: tuple[str, ...] = ()
    msg: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["device_output"] = list(self.device_output)
        return out


async def reboot_device(
    address: DeviceAddress, *, pending_only: bool = True, wait: bool = True, timeout: float = 300.0
) -> RebootResult:
    """Reboot the device and (``wait``) follow it until it runs the firmware it should boot,
    validated. ``pending_only``: leave a device without a pending reboot alone (changed false)."""
    began = time.monotonic()
    before = await device_status(address)
    root, active = before.get("running_root"), before.get("active")
    running = _slot(before, root).get("version")
    if pending_only and not before.get("pending_reboot"):
        return RebootResult(False, running, running, before.get("validated"), msg="no reboot pending; not rebooted")
    if before.get("update_in_progress"):
        raise FleetError(f"{address.host} is applying an update right now; not rebooted")
    expected = _slot(before, active).get("version")
    server = before.get("server") if isinstance(before.get("server"), dict) else {}
    watch = RebootWatch(expected, active if isinstance(active, str) else None, server.get("instance"))
    target = Target(address.host, address.port, connect_options(address.username, list(address.identities),
                                                                  address.known_hosts), address.known_hosts)  # fmt: skip
    try:
        with anyio.fail_after(STATUS_TIMEOUT):
            async with asyncssh.connect(address.host, address.port, **target.options) as conn:
                answer = await conn.run("reboot", check=False)
    except TimeoutError:
        raise DeviceUnreachable(f"{address.host}:{address.port}: no answer to `reboot`") from None
    except (OSError, asyncssh.Error) as e:
        raise DeviceUnreachable(await describe_connect_error(e, address.host, address.port, address.known_hosts)) from None
    if answer.exit_status != 0:
        raise FleetError(f"{address.host}: `reboot` failed (exit status {answer.exit_status}): "
                         f"{clean_text(str(answer.stderr or answer.stdout or '')).strip()}")  # fmt: skip
    lines: list[str] = []
    result = RebootResult(True, running, expected)
    if not wait:
        return replace(result, durations={"total": round(time.monotonic() - began, 3)},
                       msg=f"rebooting into {expected} (not waited for)")  # fmt: skip
    status = await follow_reboot(target, watch, timeout, lines.append)
    result = replace(result, durations={"total": round(time.monotonic() - began, 3)}, device_output=tuple(lines))
    if status != EXIT_OK:
        failure = lines[-1].removeprefix("sshfwup: ") if lines else "no answer"
        raise FleetError(f"{address.host}: {failure}", result)
    return replace(result, validated=True, msg=f"{expected} booted from slot {active} and is validated")
