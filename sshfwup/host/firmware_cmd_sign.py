"""``sshfwup firmware sign`` (fwup's signature, through :mod:`.firmware_sign`) and ``sshfwup keys gen``
(signing and SSH keys, through :mod:`.firmware_keys`)."""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

from sshfwup.firmware.archive import read_firmware
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.keys import load_private_key, verify_signature

from .firmware_cmd import EXIT_OK, CommandError
from .firmware_sign import sign_firmware

__all__ = ["cmd_keys_gen", "cmd_sign"]

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
    if not verify_signature(info, public):  # pragma: no cover - sign_firmware checked it
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

