"""Which firmware a delta patch applies to: a private ZIP extra field on its first resource entry.

A delta ``.fw`` (fwup's README, "Delta firmware updates") is the new firmware with one resource
replaced by an xdelta3 (VCDIFF) patch against the running slot's contents. Its meta.conf is the
new firmware's, byte for byte: the uuid and the signature stay the new firmware's, and fwup
checks the *decoded* resource against meta.conf's blake2b-256. So meta.conf cannot say which
firmware the patch was made from.

The patch says it in the local header of its first ``data/`` entry, which arrives right after
meta.conf: an extra field with the private id :data:`DELTA_SOURCE_ID` holding the source
firmware's uuid and version. libarchive (so fwup) skips extra field ids it does not know
(checked with fwup 1.16), and the field sits in the local header, not in meta.conf, so the
signature still covers exactly what it covered. The field is not signed: it lets a device refuse
a patch for the wrong firmware *before fwup writes a byte*; fwup's hash check of the decoded
bytes remains what guarantees the result.

Layout of the field's data: format byte ``1``, the uuid's 16 bytes, the version in UTF-8.
"""

from __future__ import annotations

import uuid as uuid_module
from dataclasses import dataclass

from .errors import FirmwareError

__all__ = ["DELTA_SOURCE_ID", "DeltaSource", "decode_delta_source", "encode_delta_source"]

DELTA_SOURCE_ID = 0x6673  # bytes "sf" (sshfwup); not among APPNOTE's registered or known third-party ids
_FORMAT = 1
_MAX_VERSION = 255  # bytes: a version string, not a document


@dataclass(frozen=True)
class DeltaSource:
    """The firmware a patch applies to: its fwup meta-uuid and version."""

    uuid: str
    version: str

    def __str__(self) -> str:
        return f"{self.version or '?'} (uuid {self.uuid})"


def encode_delta_source(source: DeltaSource) -> tuple[int, bytes]:
    """The extra field ``(id, data)`` naming ``source``."""
    version = source.version.encode("utf-8")
    if len(version) > _MAX_VERSION:
        raise FirmwareError(f"firmware version {source.version[:40]!r}... is too long for a delta patch's source field")
    try:
        raw = uuid_module.UUID(source.uuid).bytes
    except ValueError:
        raise FirmwareError(f"{source.uuid!r} is not a firmware uuid") from None
    return DELTA_SOURCE_ID, bytes([_FORMAT]) + raw + version


def decode_delta_source(data: bytes) -> DeltaSource:
    """The source named by a :data:`DELTA_SOURCE_ID` field's data; FirmwareError if it is malformed."""
    if len(data) < 17 or data[0] != _FORMAT or len(data) > 17 + _MAX_VERSION:
        raise FirmwareError("corrupt delta patch: its source field (which firmware it applies to) is unreadable")
    try:
        version = data[17:].decode("utf-8")
    except UnicodeDecodeError:
        raise FirmwareError("corrupt delta patch: its source firmware's version is not UTF-8") from None
    return DeltaSource(str(uuid_module.UUID(bytes=bytes(data[1:17]))), version)
