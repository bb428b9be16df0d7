"""``sshfwup firmware info``: what a ``.fw`` holds, its signature, and what its root filesystem claims.

Also the reading every command that takes whole ``.fw`` files shares (:func:`read_full_firmware`:
a clear message for a missing file or a delta patch) and the JSON form of a firmware's identity.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sshfwup.firmware.archive import FirmwareInfo, read_firmware
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.keys import load_public_key, verify_signature
from sshfwup.firmware.manifest import Manifest, ManifestError, inside

from .firmware_cmd import EXIT_FAILED, EXIT_OK, CommandError, claim_text, human_size
from .firmware_image import RootfsError, read_rootfs_view

__all__ = ["cmd_info", "firmware_json", "read_full_firmware", "resource_hashes"]




def resource_hashes(info: FirmwareInfo) -> dict[str, tuple[int, str]]:
    """Each resource's (length, blake2b-256 hex), as meta.conf lists them."""
    return {r.name: (r.length, r.blake2b_256) for r in info.meta.resources.values()}


def read_full_firmware(path: str) -> tuple[Path, FirmwareInfo]:
    """Read and verify a whole ``.fw`` given on the command line; a delta patch is named as one."""
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


def firmware_json(fw: Path, info: FirmwareInfo) -> dict[str, Any]:
    """A firmware's identity in ``info --json`` and ``diff --json``."""
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
    fw, info = read_full_firmware(args.file)
    keys = _public_keys(args.public_key)
    valid_key = next((p for p, k in keys if verify_signature(info, k)), None)
    out = firmware_json(fw, info)
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


def _print_info(out: dict[str, Any]) -> None:
    print(f"file:          {out['file']} ({human_size(out['archive_size'])})")
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
        print(f"  {r['name']:<24} {human_size(r['size']):>10}  ({human_size(r['compressed'])} compressed)")
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
        print(f"  HOT_RELOAD:  {word} (claims: {claim_text(marker['hot'])})")
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

