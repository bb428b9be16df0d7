"""``sshfwup firmware manifest|mark|build|delta``: prepare a staging root filesystem and make ``.fw``
files from it.

``manifest`` / ``mark`` prepare the staging tree for the device's hot-or-reboot decision (the
manifest, and the HOT_RELOAD marker: ``mix firmware.enable_reload`` / ``require_reboot``);
``build`` makes a ``.fw`` from it (:mod:`.firmware_build`); ``delta`` makes a patch that turns
one firmware into another on a device, in kilobytes (:mod:`.firmware_delta`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.manifest import (
    DEFAULT_APP_DIRS,
    Manifest,
    ManifestError,
    inside,
    read_marker,
    resolve_in_root,
    write_marker,
)

from .firmware_cmd import EXIT_OK, CommandError, claim_text, human_size, print_error

__all__ = ["cmd_build", "cmd_delta", "cmd_manifest", "cmd_mark"]




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
        f"{'; '.join(boot)}; HOT_RELOAD {'missing' if hot is None else str(hot).lower()}: {claims}: {claim_text(hot)}"
    )


def _hot_option(args: argparse.Namespace) -> bool | None:
    return True if args.hot else False if args.reboot else None


def cmd_manifest(args: argparse.Namespace) -> int:
    from .firmware_build import BuildError, prepare_rootfs

    root = _staging_root(args.rootfs_dir)
    app_dirs = tuple(args.app_dir or DEFAULT_APP_DIRS)
    for d in app_dirs:
        if not resolve_in_root(root, d).is_dir():
            print_error(f"warning: app directory {d} does not exist in {root}")
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
    print(f"built {built.path}: {built.version or '?'} (uuid {built.uuid}), {human_size(built.size)}, {signed}")
    print(_manifest_line(built.manifest, args.manifest_path, built.hot, "it claims"))
    return EXIT_OK


def cmd_delta(args: argparse.Namespace) -> int:
    from .firmware_delta import make_patch

    try:
        patch = make_patch(Path(args.old), Path(args.new), Path(args.output), resource=args.rootfs_resource)
    except FirmwareError as e:
        raise CommandError(str(e)) from None
    print(f"patch:  {patch.path}: {patch.source.version} → {patch.target.version} ({patch.resource} as an xdelta3 patch)")
    print(f"full:   {human_size(patch.full_size)} ({patch.full_size} bytes, {args.new})")
    print(f"delta:  {human_size(patch.size)} ({patch.size} bytes)")
    print(f"ratio:  {patch.ratio:.2%} of the full firmware")
    print(f"applies only to a device running {patch.source}; others refuse it before writing anything")
    return EXIT_OK


def cmd_mark(args: argparse.Namespace) -> int:
    root = _staging_root(args.rootfs_dir)
    parent = resolve_in_root(root, args.marker_path).parent
    if not parent.is_dir():
        print_error(f"warning: {parent} did not exist in {root}; created it")
    target = write_marker(root, bool(args.hot), path=args.marker_path)
    print(f"{target}: {'true' if args.hot else 'false'}")
    print(f"next build claims: {claim_text(bool(args.hot))}")
    if args.hot:
        print("(the device still checks the manifest and reboots if anything outside the app changed)")
    return EXIT_OK

