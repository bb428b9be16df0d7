"""Sign ``.fw`` archives with ``fwup -S`` (fwup's own signer), checking the input and the result.

``fwup -S -s KEY -i IN -o OUT`` writes ``meta.conf.ed25519`` (the ed25519 signature over the exact
meta.conf bytes) before ``meta.conf`` and copies every resource, replacing an old signature. Around
it this module adds what fwup does not do (measured with fwup 1.16):

- every resource is checked against meta.conf (length and blake2b-256) before signing: fwup -S
  copies resources unchecked;
- meta.conf keeps its timestamp, which is the firmware's creation date (``fwup -m``): fwup -S
  stamps it with ``$SOURCE_DATE_EPOCH`` or the current time, so it is given the old timestamp;
- fwup -S writes ``IN.tmp`` next to its input; here the input is a link in a private directory
  beside the output, so a read-only input directory is fine and the output appears only complete
  and verified (it carries the same meta.conf and a signature valid for the key).

ed25519 signatures are deterministic: the signature is the same bytes whoever makes it.
"""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from sshfwup.firmware.archive import read_entries, read_firmware, read_head
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.keys import as_private_key, verify_signature
from sshfwup.firmware.zipstream import ZipStream

log = logging.getLogger(__name__)

__all__ = ["SignError", "sign_firmware"]

_DOS_EPOCH = 315532800  # 1980-01-01: a ZIP timestamp cannot be earlier


class SignError(FirmwareError):
    """fwup could not sign the archive, or what it wrote does not check out."""


def _write_key_file(path: Path, private_key: Any) -> bytes:
    """Write the key in fwup's format (base64 of seed + public key), 0600; return the public key."""
    key = as_private_key(private_key)
    seed, public = key.private_bytes_raw(), key.public_key().public_bytes_raw()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(seed + public))
    return public


def _fwup_sign(fwup: str, key_file: Path, src: Path, out: Path, creation_time: int | None) -> None:
    env = dict(os.environ)
    if creation_time is not None and creation_time >= _DOS_EPOCH:
        env["SOURCE_DATE_EPOCH"] = str(creation_time)  # fwup -S stamps meta.conf with this
    result = subprocess.run([fwup, "-S", "-s", str(key_file), "-i", str(src), "-o", str(out)],
                            capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).strip().splitlines()  # fwup reports on stdout
        raise SignError(f"fwup -S failed for {src}: {lines[-1] if lines else f'exit status {result.returncode}'}")


def _replace_durably(tmp: Path, dst: Path) -> None:
    os.chmod(tmp, 0o644)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    dfd = os.open(dst.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def sign_firmware(src: str | os.PathLike[str], dst: str | os.PathLike[str], private_key: Any,
                  *, fwup: str | None = None) -> Path:  # fmt: skip
    """Write ``src`` to ``dst`` (may be the same file) signed with ``private_key`` (a key file,
    32 seed bytes, 64 fwup key bytes or an Ed25519PrivateKey), replacing an old signature.
    Every resource is verified first; ``dst`` appears only once complete and verified."""
    from .firmware_build import find_fwup

    src, dst = Path(src), Path(dst)
    fwup_path = find_fwup(fwup)
    with src.open("rb") as f:  # every resource's length and blake2b-256, as fwup -V checks them
        stream = ZipStream(f.read)
        unsigned = read_entries(stream, read_head(stream, source=str(src)))
    with tempfile.TemporaryDirectory(prefix=".sshfwup-sign-", dir=dst.parent) as tmp:
        key_file = Path(tmp) / "signing-key.priv"
        public = _write_key_file(key_file, private_key)
        link = Path(tmp) / "unsigned.fw"  # fwup -S writes unsigned.fw.tmp here, not beside src
        link.symlink_to(src.resolve())
        out = Path(tmp) / "signed.fw"
        _fwup_sign(fwup_path, key_file, link, out, unsigned.meta_mtime)
        signed = read_firmware(out)
        if signed.meta_conf != unsigned.meta_conf or not verify_signature(signed, public):
            raise SignError(f"{dst}: fwup -S wrote an archive whose signature does not verify")
        _replace_durably(out, dst)
    log.info("signed %s (uuid %s)", dst, signed.uuid)
    return dst
