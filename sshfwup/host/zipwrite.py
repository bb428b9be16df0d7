"""Write a ZIP archive the way fwup does: deflate, data descriptors, mode 0644.

Each entry gets the timestamp it is given (the signer keeps the source archive's), else one
fixed time ($SOURCE_DATE_EPOCH, else 1980-01-01): the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import BinaryIO

from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.zipstream import (
    CENTRAL_SIG,
    DESCRIPTOR_SIG,
    EOCD_SIG,
    LOCAL_HEADER,
    LOCAL_SIG,
    OUT_CHUNK,
)

_DEFAULT_MTIME = 315532800  # 1980-01-01T00:00:00Z, the earliest time a ZIP header can hold


def _archive_mtime() -> int:
    """Deterministic timestamp: $SOURCE_DATE_EPOCH if set, else 1980-01-01."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "")
    return max(int(value), _DEFAULT_MTIME) if value.isdigit() else _DEFAULT_MTIME


def _deflate_level(sample: bytes) -> int:
    """zlib's default level, or 0 (stored deflate blocks) for data that does not compress, such
    as a squashfs: deflating it again costs ~10x the time for nothing. Judged on the first MiB."""
    if len(sample) >= 4096 and len(zlib.compress(sample, 6)) > 0.95 * len(sample):
        return 0
    return 6


class ZipWriter:
    """Writes entries the way fwup does: deflate, data descriptors, Unix mode 0644.

    ``mtime``: every entry's timestamp; by default $SOURCE_DATE_EPOCH, else 1980-01-01.
    """

    def __init__(self, out: BinaryIO, mtime: int | None = None) -> None:
        self.out = out
        self.mtime = _archive_mtime() if mtime is None else mtime
        self.central: list[bytes] = []
        self.count = 0

    def add(
        self,
        name: str,
        chunks: Iterable[bytes],
        mtime: int | None = None,
        *,
        extra: Sequence[tuple[int, bytes]] = (),
        sizes_in_header: bool = False,
    ) -> tuple[int, str]:
        """Add one entry (timestamp ``mtime``, else the writer's); returns its (length,
        blake2b-256 hex) for checking against meta.conf.

        ``extra``: further extra fields ``(id, data)`` for the local and central headers, after
        the timestamp (readers skip ids they do not know). ``sizes_in_header``: write the CRC
        and sizes into the local header instead of a data descriptor after the data (the output
        must be seekable). fwup takes an entry whose local header gives a size other than its
        resource's length for a delta patch: that is what this is for.
        """
        raw_name = name.encode("utf-8")
        mtime = self.mtime if mtime is None else max(mtime, _DEFAULT_MTIME)
        t = time.gmtime(mtime)
        dos_time = (t.tm_hour << 11) | (t.tm_min << 5) | (t.tm_sec // 2)
        dos_date = ((t.tm_year - 1980) << 9) | (t.tm_mon << 5) | t.tm_mday
        fields = struct.pack("<HHBi", 0x5455, 5, 1, mtime)
        for field_id, data in extra:
            fields += struct.pack("<HH", field_id, len(data)) + data
        if len(fields) > 0xFFFF:
            raise FirmwareError(f"{name}: its ZIP extra fields are {len(fields)} bytes, more than 65535")
        flags = 0 if sizes_in_header else 0x08
        offset = self.out.tell()
        self.out.write(
            LOCAL_HEADER.pack(
                LOCAL_SIG, 20, flags, 8, dos_time, dos_date, 0, 0, 0, len(raw_name), len(fields)
            )
        )
        self.out.write(raw_name + fields)
        chunks = iter(chunks)
        head = bytearray()
        for chunk in chunks:
            head += chunk
            if len(head) >= OUT_CHUNK:
                break
        deflater = zlib.compressobj(_deflate_level(bytes(head[:OUT_CHUNK])), zlib.DEFLATED, -15)
        hasher = hashlib.blake2b(digest_size=32)
        crc = size = csize = 0
        for chunk in itertools.chain([bytes(head)], chunks):
            crc = zlib.crc32(chunk, crc)
            hasher.update(chunk)
            size += len(chunk)
            data = deflater.compress(chunk)
            csize += len(data)
            self.out.write(data)
        data = deflater.flush()
        csize += len(data)
        self.out.write(data)
        if max(size, csize, offset) >= 0xFFFFFFFF:
            raise FirmwareError(f"{name} is too large for a ZIP archive without zip64 (4 GiB)")
        if sizes_in_header:
            end = self.out.tell()
            self.out.seek(offset + 14)  # the local header's CRC-32, compressed and uncompressed sizes
            self.out.write(struct.pack("<III", crc, csize, size))
            self.out.seek(end)
        else:
            self.out.write(struct.pack("<IIII", DESCRIPTOR_SIG, crc, csize, size))
        self.central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                CENTRAL_SIG, 0x0314, 20, flags, 8, dos_time, dos_date, crc, csize, size,
                len(raw_name), len(fields), 0, 0, 0, 0o100644 << 16, offset,
            )
            + raw_name
            + fields
        )
        self.count += 1
        return size, hasher.hexdigest()

    def finish(self) -> None:
        start = self.out.tell()
        for record in self.central:
            self.out.write(record)
        size = self.out.tell() - start
        self.out.write(struct.pack("<IHHHHIIH", EOCD_SIG, 0, 0, self.count, self.count, size, start, 0))
