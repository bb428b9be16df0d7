"""Build-machine tooling: ``sshfwup firmware manifest|mark|build|delta|info|diff|sign`` and ``sshfwup keys gen``.

- ``manifest`` / ``mark`` prepare a staging root filesystem for the device's hot-or-reboot
  decision (the manifest, and the HOT_RELOAD marker: ``mix firmware.enable_reload`` /
  ``require_reboot``).
- ``info`` shows what a ``.fw`` holds, its signature, and what its root filesystem claims.
- ``diff`` computes the device's verdict for an update offline, with ``inspect.decide`` — the
  same function the device runs — on the manifests and marker read from the two archives
  (``--running HOST`` asks a device which firmware it runs).
- ``build`` makes a ``.fw`` from a staging tree (:mod:`.firmware_build`); ``delta`` makes a patch
  that turns one firmware into another on a device, in kilobytes (:mod:`.firmware_delta`).
- ``sign`` adds fwup's signature; ``keys gen`` makes signing and SSH keys.

Exit status: 0 done, 1 failed (message on stderr), 2 usage error, 3 ``diff --fail-on-reboot``
when the update would reboot.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .firmware_image import DEFAULT_ROOTFS_RESOURCE, RootfsError, read_rootfs_view
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.archive import FirmwareInfo, read_firmware, read_head
from sshfwup.firmware.zipstream import ZipStream
from sshfwup.firmware.keys import load_private_key, load_public_key, verify_signature
from .sign import sign_firmware
from sshfwup.firmware.inspect import DEFAULT_INTERPRETER, Change, Policy, Verdict, decide, with_resources
from sshfwup.firmware.manifest import (
    DEFAULT_APP_DIRS,
    MANIFEST_PATH,
    MARKER_PATH,
    Manifest,
    ManifestError,
    inside,
    read_marker,
    resolve_in_root,
    write_marker,
)

log = logging.getLogger(__name__)

__all__ = ["DiffResult", "compute_diff", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REBOOT = 3
_SHOWN_CHANGES = 200  # per group in the text output; --json lists all
NO_APP_REASON = "no application is supervised ([app] command is empty)"  # the device's wording


class CommandError(Exception):
    """A command failed for a reason the user can fix; the message says which."""


def _err(text: str) -> None:
    print(f"sshfwup: {text}", file=sys.stderr)


# --- manifest / mark ---------------------------------------------------------------------------


def _staging_root(text: str) -> Path:
    root = Path(text)
    if not root.is_dir():
        raise CommandError(f"{root}: not a directory (expected the staging root filesystem)")
    return root


def _boot_file(root: Path, value: str, option: str) -> str | Path:
    """A kernel/device tree argument: a path inside the rootfs (``/boot/zImage``) if it exists
    there, else a file on this machine (recorded as a virtual ``@kernel``/``@dtb`` entry)."""
    if value.startswith("/") and resolve_in_root(root, value).exists():
        return value
    host = Path(value)
    if host.is_file():
        return host
    raise CommandError(f"{option} {value}: no such file in {root} or on this machine")


def _claim(hot: bool | None) -> str:
    if hot is None:
        return "reboot required (no HOT_RELOAD marker)"
    return "hot reload (app-only change)" if hot else "reboot required"


def _marker_on_disk(root: Path, marker_path: str) -> bool | None:
    try:
        return read_marker(resolve_in_root(root, marker_path), name=marker_path)
    except ManifestError as e:
        raise CommandError(str(e)) from None


def _manifest_line(manifest: Manifest, manifest_path: str, hot: bool | None, claims: str) -> str:
    in_app = sum(1 for p in manifest.entries if inside(p, manifest.app_dirs))
    boot = [f"kernel {manifest.kernel}" if manifest.kernel else "no kernel recorded"]
    boot.append(f"device trees {', '.join(manifest.dtbs)}" if manifest.dtbs else "no device tree recorded")
    return (
        f"{manifest_path}: {len(manifest.entries)} entries, {in_app} in {', '.join(manifest.app_dirs)}; "
        f"{'; '.join(boot)}; HOT_RELOAD {'missing' if hot is None else str(hot).lower()}: {claims}: {_claim(hot)}"
    )


def _hot_option(args: argparse.Namespace) -> bool | None:
    return True if args.hot else False if args.reboot else None


def cmd_manifest(args: argparse.Namespace) -> int:
    from .firmware_build import BuildError, prepare_rootfs

    root = _staging_root(args.rootfs_dir)
    app_dirs = tuple(args.app_dir or DEFAULT_APP_DIRS)
    for d in app_dirs:
        if not resolve_in_root(root, d).is_dir():
            _err(f"warning: app directory {d} does not exist in {root}")
    kernel = _boot_file(root, args.kernel, "--kernel") if args.kernel else None
    dtbs = [_boot_file(root, d, "--dtb") for d in args.dtb]
    try:
        manifest = prepare_rootfs(root, app_dirs=app_dirs, kernel=kernel, dtbs=dtbs, hot=_hot_option(args),
                                  manifest_path=args.manifest_path, marker_path=args.marker_path)  # fmt: skip
    except BuildError as e:
        raise CommandError(str(e)) from None
    hot = _marker_on_disk(root, args.marker_path)
    print(_manifest_line(manifest, args.manifest_path, hot, "next build claims"))
    return EXIT_OK


# --- build / delta -------------------------------------------------------------------------------


def _defines(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise CommandError(f"--define {item}: expected NAME=VALUE (a variable of the fwup.conf)")
        out[name] = value
    return out


def cmd_build(args: argparse.Namespace) -> int:
    from .firmware_build import build_release

    root = _staging_root(args.rootfs_dir)
    kernel = _boot_file(root, args.kernel, "--kernel") if args.kernel else None
    dtbs = [_boot_file(root, d, "--dtb") for d in args.dtb]
    try:
        built = build_release(
            root, Path(args.output), version=args.version, app_dirs=tuple(args.app_dir or DEFAULT_APP_DIRS),
            kernel=kernel, dtbs=dtbs, hot=_hot_option(args), signing_key=Path(args.sign) if args.sign else None,
            conf=Path(args.fwup_conf) if args.fwup_conf else None, platform=args.platform,
            architecture=args.architecture, variables=_defines(args.define),
            manifest_path=args.manifest_path, marker_path=args.marker_path,
        )  # fmt: skip
    except FirmwareError as e:  # BuildError, and fwup's own refusals read back
        raise CommandError(str(e)) from None
    signed = "signed" if built.signed else "unsigned (sign with --sign KEY or `sshfwup firmware sign`)"
    print(f"built {built.path}: {built.version or '?'} (uuid {built.uuid}), {_size(built.size)}, {signed}")
    print(_manifest_line(built.manifest, args.manifest_path, built.hot, "it claims"))
    return EXIT_OK


def cmd_delta(args: argparse.Namespace) -> int:
    from .firmware_delta import make_patch

    try:
        patch = make_patch(Path(args.old), Path(args.new), Path(args.output), resource=args.rootfs_resource)
    except FirmwareError as e:
        raise CommandError(str(e)) from None
    print(f"patch:  {patch.path}: {patch.source.version} → {patch.target.version} ({patch.resource} as an xdelta3 patch)")
    print(f"full:   {_size(patch.full_size)} ({patch.full_size} bytes, {args.new})")
    print(f"delta:  {_size(patch.size)} ({patch.size} bytes)")
    print(f"ratio:  {patch.ratio:.2%} of the full firmware")
    print(f"applies only to a device running {patch.source}; others refuse it before writing anything")
    return EXIT_OK


def cmd_mark(args: argparse.Namespace) -> int:
    root = _staging_root(args.rootfs_dir)
    parent = resolve_in_root(root, args.marker_path).parent
    if not parent.is_dir():
        _err(f"warning: {parent} did not exist in {root}; created it")
    target = write_marker(root, bool(args.hot), path=args.marker_path)
    print(f"{target}: {'true' if args.hot else 'false'}")
    print(f"next build claims: {_claim(bool(args.hot))}")
    if args.hot:
        print("(the device still checks the manifest and reboots if anything outside the app changed)")
    return EXIT_OK


# --- info ----------------------------------------------------------------------------------------


def _resources(info: FirmwareInfo) -> dict[str, tuple[int, str]]:
    return {r.name: (r.length, r.blake2b_256) for r in info.meta.resources.values()}


def _read(path: str) -> tuple[Path, FirmwareInfo]:
    fw = Path(path)
    if not fw.is_file():
        raise CommandError(f"{fw}: no such file")
    try:
        return fw, read_firmware(fw)
    except FirmwareError as e:
        raise CommandError(_patch_hint(fw) or str(e)) from None


def _patch_hint(fw: Path) -> str | None:
    """For a delta patch, which cannot be read like a whole firmware: say what it is."""
    from .firmware_delta import DeltaError, read_head_info

    try:
        head = read_head_info(fw)
    except DeltaError:
        return None
    if head.delta_source is None:
        return None
    return (
        f"{fw} is a delta patch to {head.version or '?'} (uuid {head.uuid}) for a device running "
        f"{head.delta_source}: it holds only the changes to the root filesystem; give the full .fw files"
    )


def _public_keys(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    try:
        return [(p, load_public_key(p)) for p in paths]
    except FirmwareError as e:
        raise CommandError(str(e)) from None


def _firmware_json(fw: Path, info: FirmwareInfo) -> dict[str, Any]:
    return {
        "file": str(fw),
        "product": info.meta.meta.get("product"),
        "version": info.version or None,
        "platform": info.platform or None,
        "architecture": info.architecture or None,
        "uuid": info.uuid,
        "creation_date": info.creation_date,
        "signed": info.signature is not None,
    }


def _manifest_json(state: Manifest | ManifestError | None) -> dict[str, Any]:
    if state is None:
        return {"present": False}
    if isinstance(state, ManifestError):
        return {"present": True, "error": str(state)}
    files = [e for e in state.entries.values() if e.kind == "file"]
    app = [p for p in state.entries if inside(p, state.app_dirs)]
    native_app = sorted(e.path for e in files if e.native and inside(e.path, state.app_dirs))
    return {
        "present": True,
        "entries": len(state.entries),
        "files": len(files),
        "app_dirs": list(state.app_dirs),
        "app_entries": len(app),
        "native_in_app": native_app,
        "kernel": state.kernel,
        "dtbs": list(state.dtbs),
        "created_by": state.created_by,
    }


def _marker_json(state: bool | ManifestError | None) -> dict[str, Any]:
    if isinstance(state, ManifestError):
        return {"present": True, "error": str(state)}
    return {"present": state is not None, "hot": state}


def cmd_info(args: argparse.Namespace) -> int:
    fw, info = _read(args.file)
    keys = _public_keys(args.public_key)
    valid_key = next((p for p, k in keys if verify_signature(info, k)), None)
    out = _firmware_json(fw, info)
    out["description"] = info.meta.meta.get("description") or None
    out["author"] = info.meta.meta.get("author") or None
    out["archive_size"] = fw.stat().st_size
    out["signature"] = {
        "present": info.signature is not None,
        "valid": (valid_key is not None) if keys else None,
        "key": valid_key,
    }
    compressed = {e.name.removeprefix("data/"): e.compressed_size for e in info.entries}
    out["resources"] = [
        {"name": r.name, "size": r.length, "compressed": compressed.get(r.name)} for r in info.meta.resources.values()
    ]
    try:
        view = read_rootfs_view(
            fw,
            info,
            resource=args.rootfs_resource,
            manifest_path=args.manifest_path,
            marker_path=args.marker_path,
            verify_app_dirs=args.app_dir or (lambda manifest: manifest.app_dirs),
        )
        out["rootfs"] = {
            "resource": view.resource,
            "manifest": _manifest_json(view.manifest),
            "marker": _marker_json(view.marker),
            "app_mismatches": None if view.app_mismatches is None else list(view.app_mismatches),
        }
    except RootfsError as e:
        out["rootfs"] = {"error": str(e)}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        _print_info(out)
    return EXIT_OK if not keys or valid_key is not None else EXIT_FAILED


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _print_info(out: dict[str, Any]) -> None:
    print(f"file:          {out['file']} ({_size(out['archive_size'])})")
    for key in ("product", "version", "platform", "architecture", "author", "description"):
        if out.get(key):
            print(f"{key + ':':<15}{out[key]}")
    print(f"uuid:          {out['uuid']}")
    print(f"created:       {out['creation_date']}")
    sig = out["signature"]
    if not sig["present"]:
        state = "none (unsigned)" + (": not valid for the given public key" if sig["valid"] is False else "")
    elif sig["valid"] is None:
        state = "present (not checked: pass --public-key)"
    else:
        state = f"valid ({sig['key']})" if sig["valid"] else "INVALID for every given public key"
    print(f"signature:     {state}")
    print("resources:")
    for r in out["resources"]:
        print(f"  {r['name']:<24} {_size(r['size']):>10}  ({_size(r['compressed'])} compressed)")
    rootfs = out["rootfs"]
    if "error" in rootfs:
        print(f"root filesystem: not read: {rootfs['error']}")
        return
    print(f"root filesystem: {rootfs['resource']}")
    marker = rootfs["marker"]
    if "error" in marker:
        print(f"  HOT_RELOAD:  unusable: {marker['error']}")
    else:
        word = "missing" if not marker["present"] else str(marker["hot"]).lower()
        print(f"  HOT_RELOAD:  {word} (claims: {_claim(marker['hot'])})")
    m = rootfs["manifest"]
    if not m["present"]:
        print("  manifest:    missing (the device reboots for this firmware)")
    elif "error" in m:
        print(f"  manifest:    unusable: {m['error']}")
    else:
        print(f"  manifest:    {m['entries']} entries ({m['files']} files), {m['created_by']}")
        print(f"  app dirs:    {', '.join(m['app_dirs'])} ({m['app_entries']} entries)")
        print(f"  kernel:      {m['kernel'] or 'not recorded'}")
        print(f"  dtbs:        {', '.join(m['dtbs']) or 'not recorded'}")
        if m["native_in_app"]:
            print(f"  native code in the app: {', '.join(m['native_in_app'])}")
        mism = rootfs["app_mismatches"]
        if mism is not None:
            print("  app files:   " + ("match the manifest" if not mism else f"DO NOT match the manifest: {', '.join(mism)}"))


# --- diff ----------------------------------------------------------------------------------------


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
    old_path, old_info = _read(str(old_fw))
    new_path, new_info = _read(str(new_fw))
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
    verdict = with_resources(verdict, _resources(old_info), _resources(new_info),
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
        _firmware_json(old_path, old_info), _firmware_json(new_path, new_info), verdict, app_dirs, source,
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
    v = result.verdict
    if v.hot:
        print("verdict: hot reload: the device swaps the app without a reboot")
    else:
        print("verdict: reboot required")
        for reason in v.reasons:
            print(f"  - {reason}")
    _print_changes("changes inside the app", [c for c in v.changes if c.in_app])
    _print_changes("changes outside the app", [c for c in v.changes if not c.in_app])
    d = result.delta
    if d is not None and d.get("error"):
        print(f"delta:   no patch: {d['error']}")
    elif d is not None:
        print(f"delta:   {_size(d['patch_size'])} patch instead of {_size(d['full_size'])} ({d['ratio']:.2%})")


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
    if running.pending_reboot:
        warnings.append(
            f"{host} has a pending reboot (slot {running.active} boots next): it refuses uploads until it "
            "reboots, and after the reboot it runs that slot's firmware, not this one"
        )
    if running.update_in_progress:
        warnings.append(f"{host} is applying an update right now")
    running_json = {"host": host, "slot": running.slot, "version": running.version, "uuid": running.uuid,
                    "file": str(match), "pending_reboot": running.pending_reboot}  # fmt: skip
    return replace(result, warnings=tuple(warnings), running=running_json)


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
    if args.fail_on_reboot and not result.verdict.hot:
        return EXIT_REBOOT
    return EXIT_OK


# --- sign ----------------------------------------------------------------------------------------


def cmd_sign(args: argparse.Namespace) -> int:
    src = Path(args.file)
    if not src.is_file():
        raise CommandError(f"{src}: no such file")
    dst = Path(args.output) if args.output else src
    try:
        key = load_private_key(args.private_key)
        sign_firmware(src, dst, key)
        info = read_firmware(dst)
    except FirmwareError as e:
        raise CommandError(str(e)) from None
    except OSError as e:
        raise CommandError(f"{dst}: cannot write: {e.strerror}") from None
    public = key[32:]
    if not verify_signature(info, public):  # pragma: no cover - would be a bug in fwfile
        raise CommandError(f"{dst}: the signature just written does not verify")
    print(f"signed {dst}: {info.version or '?'} (uuid {info.uuid})")
    print(f"public key: {base64.b64encode(public).decode()} (devices need it in [fwup] public_keys)")
    return EXIT_OK


# --- keys ----------------------------------------------------------------------------------------


def cmd_keys_gen(args: argparse.Namespace) -> int:
    from .firmware_keys import KeyExistsError, generate_keys

    kinds = [k for k, on in (("firmware", args.firmware), ("ssh-host", args.ssh_host), ("ssh-client", args.ssh_client)) if on]
    try:
        written = generate_keys(Path(args.out), kinds or ["firmware", "ssh-host", "ssh-client"], force=args.force)
    except (KeyExistsError, OSError) as e:
        raise CommandError(str(e)) from None
    for key in written:
        print(f"{key.kind}: {key.private} (0600), {key.public}")
        if key.kind == "firmware":
            print(f"  sign:    sshfwup firmware sign FILE.fw --private-key {key.private}")
            print(f"  devices: [fwup] public_keys = [\"{key.public.name}\"] (install {key.public} on the device)")
        elif key.kind == "ssh-host":
            print(f"  install as [server] host_key on the device; fingerprint {key.fingerprint}")
            print(f"  known_hosts line: DEVICE {' '.join(key.public_text.split()[:2])}")
        else:
            print(f"  add {key.public} to the device's authorized_keys; upload with -i {key.private}")
    return EXIT_OK


# --- the command line ------------------------------------------------------------------------------


def _add_rootfs_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    p.add_argument("--rootfs-resource", metavar="NAME", help="the resource holding the root filesystem "
                   "(default: rootfs.img, or the only resource named like rootfs)")  # fmt: skip
    p.add_argument("--manifest-path", default=MANIFEST_PATH if defaults else None, metavar="PATH",
                   help=f"manifest inside the root filesystem (default {MANIFEST_PATH})")  # fmt: skip
    p.add_argument("--marker-path", default=MARKER_PATH if defaults else None, metavar="PATH",
                   help=f"HOT_RELOAD marker inside the root filesystem (default {MARKER_PATH})")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from sshfwup.cli import add_connection_arguments

    parser = argparse.ArgumentParser(prog="sshfwup", description="sshfwup build-machine tools.")
    families = parser.add_subparsers(dest="family", required=True, metavar="firmware|keys")

    fw = families.add_parser("firmware", help="prepare, inspect, compare and sign firmware",
                             description="Prepare, inspect, compare and sign firmware (.fw) files.")  # fmt: skip
    sub = fw.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("manifest", help="write the manifest (and marker) into a staging root filesystem",
                       description="Write the manifest (and with --hot/--reboot the HOT_RELOAD marker) into the "
                       "staging root filesystem, for a build system's post-build step.")  # fmt: skip
    p.add_argument("rootfs_dir", metavar="ROOTFS_DIR", help="the staging root filesystem (e.g. Buildroot's $TARGET_DIR)")
    p.add_argument("--app-dir", action="append", default=[], metavar="DIR",
                   help="app directory inside the root filesystem, repeatable (default /srv/app)")  # fmt: skip
    p.add_argument("--kernel", metavar="FILE", help="the kernel: a path inside ROOTFS_DIR (/boot/zImage) or a "
                   "file on this machine that goes to a boot partition ($BINARIES_DIR/zImage)")  # fmt: skip
    p.add_argument("--dtb", action="append", default=[], metavar="FILE", help="a device tree, same forms; repeatable")
    mark = p.add_mutually_exclusive_group()
    mark.add_argument("--hot", action="store_true", help="also write HOT_RELOAD=true (app-only release)")
    mark.add_argument("--reboot", action="store_true", help="also write HOT_RELOAD=false (needs a reboot)")
    p.add_argument("--manifest-path", default=MANIFEST_PATH, metavar="PATH",
                   help=f"where the manifest goes inside the root filesystem (default {MANIFEST_PATH})")  # fmt: skip
    p.add_argument("--marker-path", default=MARKER_PATH, metavar="PATH",
                   help=f"where the HOT_RELOAD marker goes inside the root filesystem (default {MARKER_PATH})")  # fmt: skip
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("mark", help="claim the next build hot-reloadable (--hot) or not (--reboot)",
                       description="Write the HOT_RELOAD marker into the staging root filesystem: the "
                       "equivalent of mix firmware.enable_reload / firmware.require_reboot.")  # fmt: skip
    mark = p.add_mutually_exclusive_group(required=True)
    mark.add_argument("--hot", action="store_true", help="app-only release: the device may hot-swap the app")
    mark.add_argument("--reboot", action="store_true", help="the device must reboot into this release")
    p.add_argument("rootfs_dir", metavar="ROOTFS_DIR", help="the staging root filesystem")
    p.add_argument("--marker-path", default=MARKER_PATH, metavar="PATH",
                   help=f"where the HOT_RELOAD marker goes inside the root filesystem (default {MARKER_PATH})")  # fmt: skip
    p.set_defaults(func=cmd_mark)

    p = sub.add_parser("info", help="show what a .fw holds, its signature and its root filesystem's claims",
                       description="Show a firmware's metadata, signature, resources, HOT_RELOAD marker and "
                       "manifest. With --public-key, exit 1 unless the signature is valid for one of the keys.")  # fmt: skip
    p.add_argument("file", metavar="FILE.fw", help="the firmware file")
    p.add_argument("--public-key", action="append", default=[], metavar="KEY",
                   help="fwup public key file (fwup-key.pub) to check the signature with; repeatable")  # fmt: skip
    p.add_argument("--app-dir", action="append", default=[], metavar="DIR",
                   help="app directories to check against the manifest (default: the manifest's own)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_rootfs_options(p, defaults=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("diff", help="the device's verdict for an update (hot or reboot, and why), offline",
                       description="Compute offline the verdict the device reaches when updated from OLD.fw "
                       "to NEW.fw: hot reload, or reboot with every reason, and the changed files inside and "
                       "outside the app directories. Exit 0 when the verdict was computed (3 with "
                       "--fail-on-reboot when it is a reboot), 1 on errors.")  # fmt: skip
    p.add_argument("files", nargs="+", metavar="FILE.fw", help="OLD.fw NEW.fw, or NEW.fw with --running")
    p.add_argument("--config", metavar="TOML", help="the device's sshfwup.toml: use its [inspect]/[app] settings")
    p.add_argument("--app-dir", action="append", default=[], metavar="DIR",
                   help="app directory, repeatable (default: --config's, else the new manifest's)")  # fmt: skip
    p.add_argument("--interpreter", action="append", default=[], metavar="GLOB",
                   help="interpreter path pattern, repeatable (default /usr/bin/python3* /usr/lib/python3*)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output (for CI gates)")
    p.add_argument("--fail-on-reboot", action="store_true", help="exit 3 when the update would need a reboot")
    p.add_argument("--delta", action="store_true", help="also make the delta patch and report its size")
    _add_rootfs_options(p, defaults=False)
    r = p.add_argument_group("comparing with a device (--running)")
    r.add_argument("--running", metavar="[USER@]HOST", help="ask this device (sshfwup `status --json`) what it runs")
    r.add_argument("--running-fw", action="append", default=[], metavar="FILE|DIR",
                   help="the .fw the device runs, or a directory to find it in by uuid; repeatable")  # fmt: skip
    add_connection_arguments(r)  # the same options as `sshfwup upload`
    p.set_defaults(func=lambda args, _parser=p: cmd_diff(args, _parser))

    p = sub.add_parser("build", help="build a .fw from a staging root filesystem (manifest, squashfs, fwup -c)",
                       description="Write the manifest (and with --hot/--reboot the HOT_RELOAD marker) into "
                       "ROOTFS_DIR, pack it into a reproducible squashfs and that into a .fw with fwup -c.")  # fmt: skip
    p.add_argument("rootfs_dir", metavar="ROOTFS_DIR", help="the staging root filesystem")
    p.add_argument("-o", "--output", required=True, metavar="FILE.fw", help="the firmware file to write")
    p.add_argument("--version", metavar="V", help="meta-version (default: the fwup.conf's)")
    mark = p.add_mutually_exclusive_group()
    mark.add_argument("--hot", action="store_true", help="write HOT_RELOAD=true (app-only release)")
    mark.add_argument("--reboot", action="store_true", help="write HOT_RELOAD=false (needs a reboot)")
    p.add_argument("--app-dir", action="append", default=[], metavar="DIR", help="app directory, repeatable (default /srv/app)")
    p.add_argument("--kernel", metavar="FILE", help="the kernel, as for `firmware manifest`")
    p.add_argument("--dtb", action="append", default=[], metavar="FILE", help="a device tree, repeatable")
    p.add_argument("--sign", metavar="KEY", help="fwup private key (fwup-key.priv) to sign with")
    p.add_argument("--fwup-conf", metavar="CONF", help="fwup configuration (default: sshfwup's deploy/fwup.conf)")
    p.add_argument("--platform", help="meta-platform (default: the fwup.conf's)")
    p.add_argument("--architecture", help="meta-architecture (default: the fwup.conf's)")
    p.add_argument("--define", action="append", default=[], metavar="NAME=VALUE", help="a fwup.conf variable, repeatable")
    p.add_argument("--manifest-path", default=MANIFEST_PATH, metavar="PATH", help=f"default {MANIFEST_PATH}")
    p.add_argument("--marker-path", default=MARKER_PATH, metavar="PATH", help=f"default {MARKER_PATH}")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("delta", help="make a delta patch: NEW.fw for a device running OLD.fw, in kilobytes",
                       description="Write NEW.fw with its root filesystem as an xdelta3 patch against OLD.fw's; "
                       "only a device running OLD.fw accepts it.")  # fmt: skip
    p.add_argument("old", metavar="OLD.fw", help="the firmware the device runs")
    p.add_argument("new", metavar="NEW.fw", help="the firmware to install")
    p.add_argument("-o", "--output", required=True, metavar="PATCH.fw", help="the patch file to write")
    p.add_argument("--rootfs-resource", metavar="NAME", help="the resource to patch (default: rootfs.img)")
    p.set_defaults(func=cmd_delta)

    p = sub.add_parser("sign", help="sign a .fw (meta.conf.ed25519 first, as fwup expects)",
                       description="Sign a firmware archive with an fwup private key (fwup-key.priv). "
                       "Every resource is verified on the way. Without -o the file is replaced.")  # fmt: skip
    p.add_argument("file", metavar="FILE.fw", help="the firmware file (signed in place without -o)")
    p.add_argument("--private-key", required=True, metavar="KEY", help="fwup private key (fwup-key.priv)")
    p.add_argument("-o", "--output", metavar="OUT", help="write the signed archive here (default: in place)")
    p.set_defaults(func=cmd_sign)

    keys = families.add_parser("keys", help="generate keys", description="Generate keys.")
    ksub = keys.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = ksub.add_parser("gen", help="generate firmware signing and SSH keys",
                        description="Generate an ed25519 firmware signing pair (fwup's formats), an SSH host "
                        "key for a new device and an SSH client key for uploading (OpenSSH formats). "
                        "Without --firmware/--ssh-host/--ssh-client all three. Existing files are never "
                        "replaced without --force.")  # fmt: skip
    p.add_argument("-o", "--output", "--out", dest="out", default=".", metavar="DIR",
                   help="directory for the key files (default: .)")  # fmt: skip
    p.add_argument("--firmware", action="store_true", help="fwup-key.priv / fwup-key.pub")
    p.add_argument("--ssh-host", action="store_true", help="ssh_host_ed25519_key(.pub)")
    p.add_argument("--ssh-client", action="store_true", help="id_ed25519(.pub)")
    p.add_argument("--force", action="store_true", help="replace existing key files")
    p.set_defaults(func=cmd_keys_gen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``sshfwup firmware …`` / ``sshfwup keys …``; ``argv`` starts with "firmware" or "keys"."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) and usage errors (2)
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="sshfwup: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except SystemExit as e:  # parser.error() inside a command
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    except CommandError as e:
        _err(str(e))
        return EXIT_FAILED
    except OSError as e:  # e.g. a read-only staging tree, a full disk
        _err(f"{e.filename or 'error'}: {e.strerror or e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
