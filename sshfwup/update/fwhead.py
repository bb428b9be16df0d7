"""What an upload says it is, read from its first bytes before fwup sees any of them.

A ``.fw`` starts with meta.conf (after an optional signature): product, version, platform, the
firmware's uuid (the hash of meta.conf), and every resource with its size and blake2b hash.
Reading it before fwup starts writing lets the device answer "already running this firmware"
without touching a slot. The local header of the first resource entry, right after meta.conf,
says whether the upload is a delta patch and for which firmware (:mod:`sshfwup.firmware.delta_source`), so a
patch for another firmware is refused before fwup writes a byte. It is advisory: fwup checks
everything again (signature, decoded hashes), and an upload whose head cannot be read here goes
to fwup, whose error message is the authority.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sshfwup.firmware.delta_source import DeltaSource

log = logging.getLogger(__name__)

__all__ = ["FirmwareHead", "read_head_bytes", "version_key"]

MAX_HEAD = 256 * 1024  # meta.conf is < 50 000 bytes (fwup's limit), deflated, after a 64-byte signature


@dataclass(frozen=True)
class FirmwareHead:
    uuid: str
    version: str
    platform: str
    architecture: str
    product: str
    signed: bool
    resources: tuple[tuple[str, int, str], ...]  # (name, size, blake2b-256 hex)
    delta_source: DeltaSource | None = None  # a delta patch: the firmware it applies to


def read_head_bytes(data: bytes, *, public_keys: Sequence[Path] = (), final: bool = False) -> FirmwareHead | None:
    """The firmware's head from the first bytes of an upload, or None: not there yet (more bytes
    may bring it), or not readable (``final``, or more than :data:`MAX_HEAD` bytes without it).
    With ``public_keys`` an unsigned or wrongly signed head is not readable."""
    from sshfwup.firmware.errors import FirmwareError  # first upload only: not at serve start-up
    from sshfwup.firmware.zipstream import ZipStream  # first upload only: not at serve start-up
    from sshfwup.firmware.archive import read_head  # first upload only: not at serve start-up
    from sshfwup.firmware.delta_source import DELTA_SOURCE_ID, decode_delta_source

    try:
        stream = ZipStream(io.BytesIO(data).read)
        info = read_head(stream, public_keys=public_keys)
        first = stream.next_entry()  # the first resource's local header (None: the archive has none)
        field = first.extra_field(DELTA_SOURCE_ID) if first is not None else None
        delta_source = decode_delta_source(field) if field is not None else None
    except FirmwareError as e:
        if final or len(data) >= MAX_HEAD:
            log.info("cannot read the upload's meta.conf (%s); fwup will judge it", e)
        return None
    meta = info.meta.meta
    return FirmwareHead(
        uuid=info.uuid,
        version=meta.get("version", ""),
        platform=meta.get("platform", ""),
        architecture=meta.get("architecture", ""),
        product=meta.get("product", ""),
        signed=info.signature is not None,
        resources=tuple((r.name, r.length, r.blake2b_256) for r in info.meta.resources.values()),
        delta_source=delta_source,
    )


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order versions number by number (1.10.0 > 1.9.2; 2.0.0-rc1 < 2.0.0 is not attempted:
    pre-release suffixes compare as text after the numbers)."""
    import re

    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)
