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

This module is the command line: the options of every command and :func:`main`. Each command's
work is in its own module: :mod:`.firmware_cmd_prepare` (manifest, mark, build, delta),
:mod:`.firmware_cmd_info`, :mod:`.firmware_cmd_diff`, :mod:`.firmware_cmd_sign` (sign, keys gen).

Exit status: 0 done, 1 failed (message on stderr), 2 usage error, 3 ``diff --fail-on-reboot``
when the update would reboot.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from sshfwup.connection_options import add_connection_arguments
from sshfwup.firmware.manifest import MANIFEST_PATH, MARKER_PATH

from .firmware_cmd import EXIT_FAILED, EXIT_OK, EXIT_REBOOT, EXIT_USAGE, CommandError, print_error
from .firmware_cmd_diff import NO_APP_REASON, DiffResult, InspectSettings, cmd_diff, compute_diff
from .firmware_cmd_info import cmd_info
from .firmware_cmd_prepare import cmd_build, cmd_delta, cmd_manifest, cmd_mark
from .firmware_cmd_sign import cmd_keys_gen, cmd_sign

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REBOOT",
    "EXIT_USAGE",
    "NO_APP_REASON",
    "CommandError",
    "DiffResult",
    "InspectSettings",
    "build_parser",
    "compute_diff",
    "main",
]


def _add_rootfs_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    p.add_argument("--rootfs-resource", metavar="NAME", help="the resource holding the root filesystem "
                   "(default: rootfs.img, or the only resource named like rootfs)")  # fmt: skip
    p.add_argument("--manifest-path", default=MANIFEST_PATH if defaults else None, metavar="PATH",
                   help=f"manifest inside the root filesystem (default {MANIFEST_PATH})")  # fmt: skip
    p.add_argument("--marker-path", default=MARKER_PATH if defaults else None, metavar="PATH",
                   help=f"HOT_RELOAD marker inside the root filesystem (default {MARKER_PATH})")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--kernel", metavar="FILE", help="the kernel, as for `firmware manifest` (default: found in "
                   "ROOTFS_DIR: /boot/vmlinuz*, /boot/Image*, /boot/zImage, …)")  # fmt: skip
    p.add_argument("--dtb", action="append", default=[], metavar="FILE", help="a device tree, repeatable (default: "
                   "found in ROOTFS_DIR: /boot/*.dtb, /boot/dtbs/, /usr/lib/linux-image-*/)")  # fmt: skip
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
        print_error(str(e))
        return EXIT_FAILED
    except OSError as e:  # e.g. a read-only staging tree, a full disk
        print_error(f"{e.filename or 'error'}: {e.strerror or e}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
