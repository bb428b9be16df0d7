"""Read a ZIP archive front to back as a stream: local headers, data descriptors, deflate.

fwup reads a ``.fw`` from stdin and never seeks, so this parses the local headers in order and
stops at the central directory. Entries may carry their sizes in the local header or (like
fwup's own archives) in a data descriptor after deflated data. Every entry's CRC32 and sizes
are checked as its data ends.
"""

from __future__ import annotations

import calendar
import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import FirmwareError

# the ZIP format as it reads front to back
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
LOCAL_SIG = 0x04034B50
CENTRAL_SIG = 0x02014B50
EOCD_SIG = 0x06054B50
DESCRIPTOR_SIG = 0x08074B50

_IN_CHUNK = 256 * 1024  # compressed bytes read per step
OUT_CHUNK = 1024 * 1024  # most decompressed bytes handed out per step: bounds memory


@dataclass(frozen=True)
class ZipEntry:
    """A local file header: where an entry starts and what it says about itself."""

    name: str
    method: int
    flags: int
    crc32: int
    compressed_size: int | None  # None: given by the data descriptor after the data
    size: int | None
    mtime: int | None  # seconds since the epoch (UT extra field, else DOS time read as UTC)
    header_offset: int
    data_offset: int
    zip64: bool = False
    extra: tuple[tuple[int, bytes], ...] = ()  # the local header's extra fields: (id, data), in order

    @property
    def has_descriptor(self) -> bool:
        return bool(self.flags & 0x08)

    def extra_field(self, field_id: int) -> bytes | None:
        """The data of the first local extra field with this id, or None."""
        return next((data for fid, data in self.extra if fid == field_id), None)


@dataclass(frozen=True)
class FirmwareEntry:
    """An entry as read: its real sizes and CRC, and where its data starts in the archive."""

    name: str
    compressed_size: int
    size: int
    crc32: int
    data_offset: int


def _dos_time(date: int, tm: int) -> int | None:
    fields = (1980 + (date >> 9), (date >> 5) & 0x0F, date & 0x1F, tm >> 11, (tm >> 5) & 0x3F, (tm & 0x1F) * 2)
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31):
        return None
    return calendar.timegm(fields)


def _zlib_code(e: zlib.error) -> int:
    m = re.search(r"Error (-?\d+)", str(e))
    return int(m.group(1)) if m else -3


class ZipStream:
    """Read ZIP local entries front to back from ``read(n)`` (a file, a pipe, framed stdin).

    Never seeks and never holds more than one decompression step in memory. Stops at the
    central directory. Every entry's CRC and sizes are checked as its data ends.
    """

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._source = read
        self._pending = b""
        self._position = 0  # bytes of the archive consumed so far
        self._current: ZipEntry | None = None
        self._reading = False
        self._finished = False
        self.entries: list[FirmwareEntry] = []

    @property
    def position(self) -> int:
        return self._position

    # -- raw bytes --
    def _take(self, n: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
        else:
            data = self._source(n)
        self._position += len(data)
        return data

    def _exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = self._take(n - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def _unread(self, data: bytes) -> None:
        if data:
            self._pending = data + self._pending
            self._position -= len(data)

    # -- entries --
    def next_entry(self) -> ZipEntry | None:
        """The next local entry, or None at the central directory (the end of the data)."""
        if self._reading:
            raise RuntimeError("the previous entry's data was not read to its end")
        if self._current is not None:
            self.skip(self._current)
        if self._finished:
            return None
        start = self._position
        sig = self._exact(4)
        if len(sig) < 4:
            if start == 0:
                raise FirmwareError("not a firmware archive: the input is empty")
            raise FirmwareError(
                f"truncated firmware archive: it ends at byte {start}, before its central directory",
            )
        (value,) = struct.unpack("<I", sig)
        if value in (CENTRAL_SIG, EOCD_SIG):
            if start == 0:
                raise FirmwareError("not a firmware archive: the ZIP archive is empty")
            self._finished = True
            return None
        if value != LOCAL_SIG:
            if start == 0:
                raise FirmwareError("not a firmware archive: it does not start with a ZIP header")
            raise FirmwareError(f"corrupt firmware archive: no ZIP header at byte {start}")
        head = sig + self._exact(LOCAL_HEADER.size - 4)
        if len(head) < LOCAL_HEADER.size:
            raise FirmwareError(f"truncated firmware archive: it ends inside the ZIP header at byte {start}")
        _, _, flags, method, tm, date, crc, csize, usize, nlen, xlen = LOCAL_HEADER.unpack(head)
        raw_name = self._exact(nlen)
        extra = self._exact(xlen)
        if len(raw_name) < nlen or len(extra) < xlen:
            raise FirmwareError(f"truncated firmware archive: it ends inside the ZIP header at byte {start}")
        name = raw_name.decode("utf-8", errors="replace")
        mtime, zip64 = _dos_time(date, tm), False
        fields: list[tuple[int, bytes]] = []
        i = 0
        while i + 4 <= len(extra):
            tag, size = struct.unpack_from("<HH", extra, i)
            body = extra[i + 4 : i + 4 + size]
            fields.append((tag, body))
            if tag == 0x5455 and len(body) >= 5 and body[0] & 1:  # UT: extended timestamp
                (mtime,) = struct.unpack_from("<i", body, 1)
            elif tag == 0x0001:  # zip64 sizes
                zip64 = True
                sizes = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
                if usize == 0xFFFFFFFF and sizes:
                    usize = sizes.pop(0)
                if csize == 0xFFFFFFFF and sizes:
                    csize = sizes.pop(0)
            i += 4 + size
        if flags & 0x01:
            raise FirmwareError(f"unsupported firmware archive: {name} is encrypted")
        if method not in (0, 8):
            raise FirmwareError(f"unsupported firmware archive: {name} uses ZIP compression method {method}")
        descriptor = bool(flags & 0x08)
        sized = not descriptor
        if descriptor and method == 0:
            # Stored data has no end marker: its length must be in the header. libarchive (fwup -S,
            # fwup -c -s) writes meta.conf.ed25519 so: sizes in the header *and* a descriptor after.
            if csize != usize or (csize == 0 and usize == 0 and nlen and not name.endswith("/")):
                raise FirmwareError(f"unsupported firmware archive: {name} is stored without sizes in its header")
            sized = True
        entry = ZipEntry(
            name=name,
            method=method,
            flags=flags,
            crc32=crc,
            compressed_size=csize if sized else None,
            size=usize if sized else None,
            mtime=mtime,
            header_offset=start,
            data_offset=self._position,
            zip64=zip64,
            extra=tuple(fields),
        )
        self._current = entry
        return entry

    def read_data(self, entry: ZipEntry, chunk_size: int = OUT_CHUNK) -> Iterator[bytes]:
        """The entry's decompressed data in chunks; CRC and sizes are checked at its end.

        Read it to the end (or call :meth:`skip`): the stream cannot go on from the middle.
        """
        if entry is not self._current:
            raise RuntimeError(f"{entry.name} is not the current entry")
        self._current = None
        self._reading = True
        crc = 0
        size = 0
        consumed = 0
        name = entry.name
        if entry.method == 0:
            assert entry.compressed_size is not None
            left = entry.compressed_size
            while left:
                data = self._take(min(left, chunk_size))
                if not data:
                    raise FirmwareError(f"truncated firmware archive: it ends inside {name}")
                left -= len(data)
                consumed += len(data)
                crc = zlib.crc32(data, crc)
                size += len(data)
                yield data
        else:
            inflater = zlib.decompressobj(-15)
            limit = entry.compressed_size
            while not inflater.eof:
                if inflater.unconsumed_tail:
                    data = inflater.unconsumed_tail
                else:
                    want = _IN_CHUNK if limit is None else min(_IN_CHUNK, limit - consumed)
                    if want <= 0:
                        raise FirmwareError(f"corrupt firmware archive: {name}'s compressed data is longer than "
                                            "its header says")
                    data = self._take(want)
                    if not data:
                        raise FirmwareError(f"truncated firmware archive: it ends inside {name}")
                    consumed += len(data)
                try:
                    out = inflater.decompress(data, chunk_size)
                except zlib.error as e:
                    raise FirmwareError(f"corrupt firmware archive: {name} does not decompress ({e})") from None
                if out:
                    crc = zlib.crc32(out, crc)
                    size += len(out)
                    yield out
            leftover = inflater.unused_data
            self._unread(leftover)
            consumed -= len(leftover)
        if entry.has_descriptor:
            expected_crc, expected_csize, expected_size = self._descriptor(entry)
        else:
            expected_crc, expected_csize, expected_size = entry.crc32, entry.compressed_size, entry.size
        if consumed != expected_csize or size != expected_size:
            raise FirmwareError(
                f"corrupt firmware archive: {name} is {size} bytes ({consumed} compressed), "
                f"its ZIP header says {expected_size} ({expected_csize} compressed)",
            )
        if crc != expected_crc:
            raise FirmwareError(f"corrupt firmware archive: {name} fails its CRC check")
        self.entries.append(FirmwareEntry(name, consumed, size, crc, entry.data_offset))
        self._reading = False

    def _descriptor(self, entry: ZipEntry) -> tuple[int, int, int]:
        width = 8 if entry.zip64 else 4
        first = self._exact(4)
        if len(first) == 4 and struct.unpack("<I", first)[0] == DESCRIPTOR_SIG:
            first = self._exact(4)
        rest = self._exact(2 * width)
        if len(first) < 4 or len(rest) < 2 * width:
            raise FirmwareError(f"truncated firmware archive: it ends inside {entry.name}'s data descriptor")
        (crc,) = struct.unpack("<I", first)
        csize, usize = struct.unpack("<QQ" if width == 8 else "<II", rest)
        return crc, csize, usize

    def skip(self, entry: ZipEntry) -> None:
        """Consume an entry's data without keeping it (still checking its CRC)."""
        for _ in self.read_data(entry):
            pass

    def read_all(self, entry: ZipEntry, limit: int) -> bytes:
        """A small entry's whole data; more than ``limit`` bytes is an error."""
        buf = io.BytesIO()
        for chunk in self.read_data(entry, chunk_size=limit + 1):
            buf.write(chunk)
            if buf.tell() > limit:
                self._reading = False
                raise FirmwareError(f"corrupt firmware archive: {entry.name} is larger than {limit} bytes")
        return buf.getvalue()

