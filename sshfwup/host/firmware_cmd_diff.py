"""``sshfwup firmware diff``: the device's verdict for an update, computed offline.

:func:`compute_diff` runs ``inspect.decide`` — the same function the device runs — on the
manifests and markers read from the two archives, with the device's settings (``--config``);
``--running HOST`` asks a device which firmware it runs and takes that as the old side, and
applies the rules the device applies before fwup (:func:`sshfwup.update.rules.judge`, the same
function) to its reported state: a refusal is predicted with the device's words (exit 4).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sshfwup.firmware.archive import read_head
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.inspect import DEFAULT_INTERPRETER, Change, Policy, Verdict, decide, with_resources
from sshfwup.firmware.manifest import DEFAULT_APP_DIRS, MANIFEST_PATH, MARKER_PATH, Manifest
from sshfwup.firmware.zipstream import ZipStream

from .device_check import DeviceCheck, UnreadableFirmware, device_check
from .firmware_cmd import EXIT_OK, EXIT_REBOOT, EXIT_REFUSED, CommandError, human_size
from .firmware_cmd_info import firmware_json, read_full_firmware, resource_hashes
from .firmware_image import DEFAULT_ROOTFS_RESOURCE, RootfsError, read_rootfs_view

log = logging.getLogger(__name__)

__all__ = ["NO_APP_REASON", "DeviceCheck", "DiffResult", "InspectSettings", "cmd_diff", "compute_diff", "device_check"]

_SHOWN_CHANGES = 200  # per group in the text output; --json lists all
NO_APP_REASON = "no application is supervised ([app] command is empty)"  # the device's wording




@dataclass(frozen=True)
class InspectSettings:
    """The device's inspection settings (``[inspect]``/``[app]`` of its configuration)."""

    app_dirs: tuple[str, ...] | None = None  # None: the running (old) firmware's manifest's (else /srv/app)
    interpreter: tuple[str, ...] = DEFAULT_INTERPRETER
    manifest_path: str = MANIFEST_PATH
    marker_path: str = MARKER_PATH
    supervised: bool | None = None  # None: unknown (no device configuration given)
    source: str = "defaults"
    policy: Policy = Policy()  # bounds and exclusions (from --config); paths above take precedence
    allow_downgrade: bool | None = None  # [update] allow_downgrade from --config (None: not given)

    def device_policy(self, app_dirs: tuple[str, ...]) -> Policy:
        return replace(
            self.policy, app_dirs=app_dirs, interpreter=self.interpreter,
            manifest_path=self.manifest_path, marker_path=self.marker_path,
        )  # fmt: skip


@dataclass(frozen=True)
class DiffResult:
    old: dict[str, Any]
    new: dict[str, Any]
    verdict: Verdict
    app_dirs: tuple[str, ...]
    app_dirs_source: str
    warnings: tuple[str, ...] = ()
    running: dict[str, Any] | None = field(default=None)
    delta: dict[str, Any] | None = None  # --delta: the patch that would be sent
    device: dict[str, Any] | None = None  # --running: the device's rules before fwup (DeviceCheck.to_json)

    @property
    def refused(self) -> str | None:
        return self.device.get("refusal") if self.device else None

    def to_json(self) -> dict[str, Any]:
        changes = self.verdict.changes
        return {
            "old": self.old,
            "new": self.new,
            "running": self.running,
            "app_dirs": list(self.app_dirs),
            "app_dirs_source": self.app_dirs_source,
            "hot": self.verdict.hot,
            "reasons": list(self.verdict.reasons),
            "verdict": self.verdict.to_json(),
            "changed_in_app": [c.path for c in changes if c.in_app],
            "changed_outside_app": [c.path for c in changes if not c.in_app],
            "warnings": list(self.warnings),
            "delta": self.delta,
            "device": self.device,
        }


def compute_diff(
    old_fw: Path,
    new_fw: Path,
    settings: InspectSettings = InspectSettings(),
    *,
    rootfs_resource: str | None = None,
) -> DiffResult:
    """The device's verdict for updating from ``old_fw`` to ``new_fw``, computed offline.

    Reads each archive's manifest and marker as the device reads them from the mounted slots,
    checks the new firmware's app files against its manifest as the device does, and calls
    ``inspect.decide`` with the device's settings.
    """
    old_path, old_info = read_full_firmware(str(old_fw))
    new_path, new_info = read_full_firmware(str(new_fw))
    try:
        old_view = read_rootfs_view(
            old_path, old_info, resource=rootfs_resource, policy=settings.device_policy(DEFAULT_APP_DIRS)
        )
        # The device's app dirs are its configuration; without one, the running firmware's
        # manifest stands in for it — never the new firmware's claims.
        if settings.app_dirs is not None:
            app_dirs, source = settings.app_dirs, settings.source
        elif isinstance(old_view.manifest, Manifest):
            app_dirs, source = tuple(old_view.manifest.app_dirs), "the running firmware's manifest"
        else:
            app_dirs, source = DEFAULT_APP_DIRS, "default"
        policy = settings.device_policy(app_dirs)
        new_view = read_rootfs_view(
            new_path, new_info, resource=rootfs_resource, policy=policy, verify_app_dirs=app_dirs,
            running=old_view.manifest,
        )  # fmt: skip
    except RootfsError as e:
        raise CommandError(str(e)) from None
    try:
        verdict = decide(
            old_view.manifest,
            new_view.manifest,
            new_view.marker,
            app_dirs=app_dirs,
            interpreter=policy.interpreter,
            app=new_view.app,
            exclude=policy.excluded(None),
        )
    except ValueError as e:
        raise CommandError(str(e)) from None
    verdict = replace(verdict, old_version=old_info.version or "?", new_version=new_info.version or "?")
    verdict = with_resources(verdict, resource_hashes(old_info), resource_hashes(new_info),
                             rootfs_resource or DEFAULT_ROOTFS_RESOURCE)  # fmt: skip
    if verdict.hot and settings.supervised is False:
        verdict = replace(verdict, hot=False, reasons=(NO_APP_REASON,))
    warnings = []
    if (old_info.platform, old_info.architecture) != (new_info.platform, new_info.architecture):
        warnings.append(
            f"platform differs: {new_info.platform}/{new_info.architecture} firmware for a "
            f"{old_info.platform}/{old_info.architecture} device; fwup refuses it before any inspection"
        )
    if old_info.uuid == new_info.uuid:
        warnings.append("both files are the same firmware (same uuid)")
    return DiffResult(
        firmware_json(old_path, old_info), firmware_json(new_path, new_info), verdict, app_dirs, source,
        tuple(warnings),
    )  # fmt: skip


def _change_line(c: Change) -> str:
    detail = f" ({c.what})" if c.kind == "changed" or c.what != "file" else ""
    native = ", native code" if c.native and c.kind != "removed" else ""
    return f"  {c.kind:<8} {c.path}{detail}{native}"


def _print_changes(title: str, changes: Sequence[Change]) -> None:
    print(f"{title}: {len(changes)}")
    for c in changes[:_SHOWN_CHANGES]:
        print(_change_line(c))
    if len(changes) > _SHOWN_CHANGES:
        print(f"  ... and {len(changes) - _SHOWN_CHANGES} more (--json lists all)")


def _print_diff(result: DiffResult) -> None:
    if result.running:
        r = result.running
        print(f"device:  {r['host']} runs slot {r['slot']}: {r['version'] or '?'} (uuid {r['uuid']})")
    for label, fw in (("old", result.old), ("new", result.new)):
        print(f"{label}:     {fw['file']}: {fw['version'] or '?'} (uuid {fw['uuid']})")
    print(f"app dirs: {', '.join(result.app_dirs)} (from {result.app_dirs_source})")
    for w in result.warnings:
        print(f"warning: {w}")
    d = result.device
    if d is not None:
        print(f"rules:   {d['rules_source']}")
    if d is not None and d.get("refusal"):
        print(f"verdict: REFUSED: the device would refuse this upload before fwup: {d['refusal']}")
        print("  (the verdict below is what it would do once it takes this firmware)")
    elif d is not None and d.get("unchanged"):
        print(f"verdict: nothing to do: {d['unchanged']}")
    elif d is not None and d.get("downgrade"):
        print("note:    a downgrade, allowed by the device ([update] allow_downgrade = true)")
    v = result.verdict
    if v.hot:
        print("verdict: hot reload: the device swaps the app without a reboot")
    else:
        print("verdict: reboot required")
        for reason in v.reasons:
            print(f"  - {reason}")
    _print_changes("changes inside the app", [c for c in v.changes if c.in_app])
    _print_changes("changes outside the app", [c for c in v.changes if not c.in_app])
    p = result.delta
    if p is not None and p.get("error"):
        print(f"delta:   no patch: {p['error']}")
    elif p is not None:
        print(f"delta:   {human_size(p['patch_size'])} patch instead of {human_size(p['full_size'])} ({p['ratio']:.2%})")


def _delta_json(old_fw: str, new_fw: str, resource: str | None) -> dict[str, Any]:
    """``diff --delta``: make the patch that would be sent, in a temporary directory."""
    import tempfile

    from .firmware_delta import make_patch

    with tempfile.TemporaryDirectory(prefix="sshfwup-diff-delta-") as tmp:
        try:
            patch = make_patch(Path(old_fw), Path(new_fw), Path(tmp) / "patch.fw", resource=resource)
        except FirmwareError as e:
            return {"error": str(e)}
    return {"patch_size": patch.size, "full_size": patch.full_size, "ratio": round(patch.ratio, 6),
            "resource": patch.resource}  # fmt: skip


def _settings(args: argparse.Namespace) -> InspectSettings:
    settings = InspectSettings()
    if args.config:
        from sshfwup.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as e:
            raise CommandError(str(e)) from None
        settings = InspectSettings(
            app_dirs=config.app_dirs,
            interpreter=config.inspect.interpreter,
            manifest_path=config.inspect.manifest,
            marker_path=config.inspect.marker,
            supervised=bool(config.app.command),
            source=str(args.config),
            policy=Policy.from_config(config),
            allow_downgrade=config.update.allow_downgrade,
        )
    if args.app_dir:
        settings = replace(settings, app_dirs=tuple(args.app_dir), source="--app-dir")
    if args.interpreter:
        settings = replace(settings, interpreter=tuple(args.interpreter))
    if args.manifest_path:
        settings = replace(settings, manifest_path=args.manifest_path)
    if args.marker_path:
        settings = replace(settings, marker_path=args.marker_path)
    return settings


def _firmware_candidates(paths: Sequence[str]) -> list[Path]:
    found: list[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found.extend(sorted(q for q in p.glob("*.fw") if q.is_file()))
        elif p.is_file():
            found.append(p)
        else:
            raise CommandError(f"--running-fw {p}: no such file or directory")
    if not found:
        raise CommandError(f"--running-fw {', '.join(paths)}: no .fw files there")
    return found


def _uuid_of(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return read_head(ZipStream(f.read), source=str(path)).uuid
    except (OSError, FirmwareError) as e:
        log.warning("skipping %s: %s", path, e)
        return None


def _running_diff(args: argparse.Namespace, new_fw: str, settings: InspectSettings) -> DiffResult:
    import anyio

    from .firmware_remote import RemoteError, fetch_status, running_firmware

    if not args.running_fw:
        raise CommandError(
            "--running needs --running-fw FILE|DIR: the .fw the device runs (or a directory of released "
            "firmware to pick it from by uuid); its manifest is the \"old\" side of the diff"
        )
    candidates = _firmware_candidates(args.running_fw)  # fail early, before connecting
    user, _, host = args.running.rpartition("@")
    known: str | None | tuple[()] = ()
    if args.insecure_accept_host_key:
        known = None
    elif args.known_hosts:
        known = str(Path(args.known_hosts).expanduser())
    try:
        status = anyio.run(
            lambda: fetch_status(
                host, port=args.port, username=user or None, identities=args.identity or None, known_hosts=known
            )
        )
        running = running_firmware(status, host)
    except RemoteError as e:
        raise CommandError(str(e)) from None
    uuids = {c: _uuid_of(c) for c in candidates}
    match = next((c for c, u in uuids.items() if u == running.uuid), None)
    if match is None:
        listed = "; ".join(f"{c}: uuid {u or 'unreadable'}" for c, u in uuids.items())
        raise CommandError(
            f"{host} runs firmware {running.version or '?'} (uuid {running.uuid}) from slot {running.slot}, "
            f"but no given file is that firmware ({listed}); pass the exact .fw the device was updated with"
        )
    result = compute_diff(match, Path(new_fw), settings, rootfs_resource=args.rootfs_resource)
    warnings = list(result.warnings)
    try:
        device = device_check(status, host, Path(new_fw), settings.allow_downgrade)
    except UnreadableFirmware as e:
        raise CommandError(str(e)) from None
    warnings += device.notes
    if running.update_in_progress:
        warnings.append(f"{host} is applying an update right now")
    running_json = {"host": host, "slot": running.slot, "version": running.version, "uuid": running.uuid,
                    "file": str(match), "pending_reboot": running.pending_reboot}  # fmt: skip
    return replace(result, warnings=tuple(warnings), running=running_json, device=device.to_json())


def cmd_diff(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = _settings(args)
    if args.running:
        if len(args.files) != 1:
            parser.error("with --running give only the new firmware: diff --running HOST NEW.fw --running-fw FILE")
        result = _running_diff(args, args.files[0], settings)
    else:
        if len(args.files) != 2:
            parser.error("give two firmware files: diff OLD.fw NEW.fw (or --running HOST NEW.fw)")
        if args.running_fw:
            parser.error("--running-fw goes with --running HOST")
        result = compute_diff(Path(args.files[0]), Path(args.files[1]), settings, rootfs_resource=args.rootfs_resource)
    if args.delta:
        result = replace(result, delta=_delta_json(result.old["file"], result.new["file"], args.rootfs_resource))
    if args.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    else:
        _print_diff(result)
    if result.refused:
        return EXIT_REFUSED  # whatever the verdict: this upload would not happen (not a pass for --fail-on-reboot)
    if args.fail_on_reboot and not result.verdict.hot and not (result.device or {}).get("unchanged"):
        return EXIT_REBOOT
    return EXIT_OK

