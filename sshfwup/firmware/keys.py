"""fwup's signing keys and the ed25519 signature over meta.conf.

fwup's key files are base64 (padded, no newline) of the raw 32-byte public key and of the
64-byte libsodium secret key (32-byte seed followed by the public key). A signed archive holds
``meta.conf.ed25519``, a 64-byte raw ed25519 signature over the exact meta.conf bytes: that
covers the resources too, since meta.conf holds their blake2b-256 hashes.

``cryptography`` is imported only where a key is used, so reading archives starts fast.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import FirmwareError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )


class SignedMetaConf(Protocol):
    """What a signature check needs of an archive (:class:`~sshfwup.firmware.archive.FirmwareInfo`
    has both): described here so that this module needs nothing from the archive reader, which
    imports it."""

    @property
    def signature(self) -> bytes | None: ...

    @property
    def meta_conf(self) -> bytes: ...


def _b64_or_raw(data: bytes, size: int) -> bytes | None:
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
        if len(decoded) == size:
            return decoded
    except ValueError:
        pass
    return data if len(data) == size else None  # fwup before 1.0 wrote raw key bytes


def _read_key_file(path: str | os.PathLike[str], size: int, kind: str, fwup_kind: str) -> bytes:
    """The raw bytes of a key file; ``kind`` names the key for an operator, ``fwup_kind`` as fwup does."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FirmwareError(f"{path}: cannot read {kind} key: {e.strerror}") from None
    key = _b64_or_raw(data, size)
    if key is None:
        raise FirmwareError(f"{path}: not an fwup {kind} key (expected base64 of {size} bytes)")
    return key


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """A ``fwup-key.pub`` (base64 of the raw 32-byte ed25519 key) → the 32 raw bytes."""
    return _read_key_file(path, 32, "public", "public")


def load_private_key(path: str | os.PathLike[str]) -> bytes:
    """A ``fwup-key.priv`` (base64 of seed + public key, 64 bytes) → the 64 raw bytes."""
    key = _read_key_file(path, 64, "private", "signing")
    as_private_key(key)  # checks that the public half belongs to the seed
    return key


def generate_keypair() -> tuple[str, str]:
    """New signing keys in fwup's file formats: (``fwup-key.priv`` text, ``fwup-key.pub`` text)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    seed = private.private_bytes_raw()
    public = private.public_key().public_bytes_raw()
    return base64.b64encode(seed + public).decode("ascii"), base64.b64encode(public).decode("ascii")


def as_private_key(key: Any) -> "Ed25519PrivateKey":
    """A signing key from a key file path, 32 seed bytes, 64 fwup key bytes or an Ed25519PrivateKey."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        key = load_private_key(key)
    if not isinstance(key, (bytes, bytearray)) or len(key) not in (32, 64):
        raise FirmwareError("a signing key must be a key file, 32 seed bytes or 64 fwup key bytes")
    private = Ed25519PrivateKey.from_private_bytes(bytes(key[:32]))
    if len(key) == 64 and private.public_key().public_bytes_raw() != bytes(key[32:]):
        raise FirmwareError("corrupt signing key: its public half does not belong to its seed")
    return private


def as_public_key(key: Any) -> "Ed25519PublicKey":
    """A public key from a key file path, 32 raw bytes or an Ed25519PublicKey."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        key = load_public_key(key)
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise FirmwareError("a public key must be a key file or 32 raw bytes")
    return Ed25519PublicKey.from_public_bytes(bytes(key))


def signature_matches(key: "Ed25519PublicKey", signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is ``key``'s ed25519 signature over ``message``."""
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def verify_signature(info: SignedMetaConf, public_key: Any) -> bool:
    """True if the archive's meta.conf carries a valid signature by ``public_key``."""
    if info.signature is None:
        return False
    return signature_matches(as_public_key(public_key), info.signature, info.meta_conf)
