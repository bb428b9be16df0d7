"""``sshfwup keys gen``: the keys a new device and its build machine need.

- **firmware**: an ed25519 signing pair in fwup's own file formats (``fwup-key.priv``,
  ``fwup-key.pub``: base64 of the raw keys), usable with ``fwup -S``/``-p`` and with
  ``sshfwup firmware sign`` / ``[fwup] public_keys``.
- **ssh-host**: the device's SSH host key in OpenSSH format (``ssh_host_ed25519_key`` + ``.pub``),
  for pinning the device in ``known_hosts`` before it ships.
- **ssh-client**: an uploader's key in OpenSSH format (``id_ed25519`` + ``.pub``) for the
  device's ``authorized_keys``.

Private keys are written with mode 0600, public ones 0644. An existing file is never replaced
unless ``force`` is given; without it the whole run is refused before anything is written.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sshfwup.system.fsutil import write_atomically
from sshfwup.firmware.keys import generate_keypair

log = logging.getLogger(__name__)

__all__ = ["KEY_FILES", "KeyExistsError", "KeyKind", "WrittenKey", "generate_keys"]

KeyKind = Literal["firmware", "ssh-host", "ssh-client"]
KEY_FILES: dict[str, tuple[str, str]] = {
    "firmware": ("fwup-key.priv", "fwup-key.pub"),
    "ssh-host": ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"),
    "ssh-client": ("id_ed25519", "id_ed25519.pub"),
}


class KeyExistsError(Exception):
    """A key file already exists and ``force`` was not given."""


@dataclass(frozen=True)
class WrittenKey:
    kind: str
    private: Path
    public: Path
    public_text: str  # the public key as written (fwup base64, or an OpenSSH line)
    fingerprint: str  # OpenSSH SHA256 fingerprint; for fwup keys the base64 public key itself


def _write(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Write ``path`` with exactly ``mode``, atomically; never replace it unless ``force``."""
    try:
        write_atomically(path, data, mode=mode, overwrite=force)
    except FileExistsError:
        raise KeyExistsError(f"{path} already exists (use --force to replace it)") from None


def _ssh_key(comment: str) -> tuple[bytes, bytes, str]:
    import asyncssh

    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    return key.export_private_key("openssh"), key.export_public_key("openssh"), key.get_fingerprint()


def generate_keys(
    out_dir: Path, kinds: Iterable[str], *, force: bool = False, comment: str | None = None
) -> list[WrittenKey]:
    """Generate and write each kind of key into ``out_dir`` (created 0700 if missing)."""
    wanted = list(dict.fromkeys(kinds))
    unknown = [k for k in wanted if k not in KEY_FILES]
    if unknown:
        raise ValueError(f"unknown key kind {unknown[0]!r} (known: {', '.join(KEY_FILES)})")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is not a directory")
    if not force:
        existing = [out_dir / name for k in wanted for name in KEY_FILES[k] if (out_dir / name).exists()]
        if existing:
            raise KeyExistsError(
                f"{', '.join(str(p) for p in existing)} already exist{'s' if len(existing) == 1 else ''}; "
                "nothing was written (use --force to replace)"
            )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    host = socket.gethostname()
    written = []
    for kind in wanted:
        private_name, public_name = KEY_FILES[kind]
        private, public = out_dir / private_name, out_dir / public_name
        if kind == "firmware":
            private_text, public_text = generate_keypair()
            private_bytes, public_bytes, fingerprint = private_text.encode(), public_text.encode(), public_text
        else:
            label = comment or ("sshfwup-device" if kind == "ssh-host" else f"sshfwup-uploader@{host}")
            private_bytes, public_bytes, fingerprint = _ssh_key(label)
            public_text = public_bytes.decode().strip()
        _write(private, private_bytes, 0o600, force=force)
        _write(public, public_bytes, 0o644, force=force)
        log.info("wrote %s key %s", kind, private)
        written.append(WrittenKey(kind, private, public, public_text, fingerprint))
    return written
