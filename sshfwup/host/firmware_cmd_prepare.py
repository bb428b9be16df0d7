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

from .firmware_bootfiles import BootFiles
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
    dtbs: list[str | Path] = [_boot_file(root, d, "--dtb") for d in args.dtb]
    found = _find_boot(root, kernel is None, not dtbs)
    if kernel is None and found is not None and found.kernel is not None:
        kernel = found.kernel
    if not dtbs and found is not None:
        dtbs = list(found.dtbs)
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
    if found is not None:
        print(_found_line(found, root, args.kernel is None, not args.dtb))
    print(_manifest_line(built.manifest, args.manifest_path, built.hot, "it claims"))
    if built.hot and (warning := _hot_warning(built.manifest, found)):
        print_error(warning)
    return EXIT_OK


def _find_boot(root: Path, kernel: bool, dtbs: bool) -> BootFiles | None:
    """The kernel and device trees found in ``root`` when either was not given (None: both were)."""
    from .firmware_bootfiles import find_boot_files

    return find_boot_files(root) if kernel or dtbs else None


def _found_line(found: BootFiles, root: Path, kernel: bool, dtbs: bool) -> str:
    """What ``build`` found in the tree for what it was not told (one line)."""
    said = []
    if kernel:
        if found.kernel is not None:
            said.append(f"kernel {found.kernel}")
        elif found.ambiguous:
            said.append(f"no single kernel (several: {', '.join(found.kernels)})")
        else:
            said.append("no kernel")
    if dtbs:
        if not found.dtbs:
            said.append("no device tree")
        elif len(found.dtbs) <= 3:
            said.append(f"device tree{'s' if len(found.dtbs) > 1 else ''} {', '.join(found.dtbs)}")
        else:
            said.append(f"{len(found.dtbs)} device trees ({', '.join(found.dtbs[:2])}, …)")
    anything = (kernel and found.kernel) or (dtbs and found.dtbs)
    options = "recorded; --kernel/--dtb name others" if anything else "--kernel/--dtb name them"
    return f"found in {root}: {'; '.join(said)} ({options})"


def _hot_warning(manifest: Manifest, found: BootFiles | None) -> str | None:
    """Why a build marked hot may still make the device reboot: no kernel/device tree recorded."""
    missing = [what for what, have in (("kernel", manifest.kernel), ("device tree", manifest.dtbs)) if not have]
    if not missing:
        return None
    both, none = " and ".join(missing), " and no ".join(missing)
    several = f" (several kernels in /boot: {', '.join(found.kernels)})" if found is not None and found.ambiguous else ""
    options = " ".join(o for o, what in (("--kernel PATH", "kernel"), ("--dtb PATH", "device tree")) if what in missing)
    return (
        f"warning: marked hot, but this build records no {none}{several}: a device whose running firmware "
        f"records its {both} will refuse the hot swap and require a reboot (\"{missing[0]} changed (not "
        f"recorded in the new firmware)\").\n"
        f"  Name them: {options} (a path inside the root filesystem, e.g. /boot/zImage, or a file on this "
        f"machine for a boot partition; --dtb repeatable)."
    )


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

