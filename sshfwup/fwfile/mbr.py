"""The MBR that meta.conf's ``mbr`` section describes: encode it, and read partition offsets back."""

from __future__ import annotations

import struct

from .errors import FirmwareError
from .metaconf import BLOCK_SIZE, Mbr


def _chs(lba: int) -> bytes:
    heads, sectors = 255, 63
    cylinder = lba // (heads * sectors)
    if cylinder > 1023:
        return bytes((254, 255, 255))
    head = (lba // sectors) % heads
    sector = lba % sectors + 1
    return bytes((head, ((cylinder >> 2) & 0xC0) | sector, cylinder & 0xFF))


def encode_mbr(mbr: Mbr, *, device_blocks: int | None = None) -> bytes:
    """A 512-byte MBR for ``mbr`` (empty boot code). An ``expand`` partition grows to the end of
    a device of ``device_blocks`` blocks."""
    sector = bytearray(BLOCK_SIZE)
    for p in mbr.partitions:
        if not 0 <= p.index < 4:
            raise FirmwareError(f'mbr "{mbr.name}": partition {p.index} is not 0..3')
        count = p.block_count
        if p.expand and device_blocks is not None and device_blocks - p.block_offset > count:
            count = device_blocks - p.block_offset
        last = p.block_offset + count - 1 if count else p.block_offset
        sector[446 + 16 * p.index : 446 + 16 * (p.index + 1)] = (
            bytes((0x80 if p.boot else 0,)) + _chs(p.block_offset) + bytes((p.type,)) + _chs(last)
            + struct.pack("<II", p.block_offset, count)
        )
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def mbr_partition_offsets(sector: bytes) -> list[int] | None:
    """First block of each of the 4 primary partitions, or None if ``sector`` is no MBR."""
    if len(sector) < BLOCK_SIZE or sector[510:512] != b"\x55\xaa":
        return None
    return [struct.unpack_from("<I", sector, 446 + 16 * i + 8)[0] for i in range(4)]
