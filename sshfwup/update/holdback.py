"""Hold back the end of an upload until it has genuinely ended: no cut upload can commit.

fwup reads a ``.fw`` (a zip archive) as a stream and commits — runs the task's ``on-finish``,
which switches the boot environment — as soon as it reads the first bytes of the zip central
directory, near the end of the file. It needs neither EOF nor the framing's end packet. So an
upload cut a few bytes before its end would be applied as if it were whole.

:class:`Holdback` keeps the last :data:`HOLD` bytes of the upload away from fwup. Only after the
transport saw a genuine end of the upload (the client's EOF, scp's declared size and its
acknowledgement, SFTP's close) does :func:`check_end` look at those bytes: the archive must end
with a zip end-of-central-directory record whose central directory is where the record says, and
lies inside the held bytes. Only then does fwup get the rest. A cut at any offset therefore
leaves fwup short of the central directory: it never commits, and killing it changes nothing
(it keeps its environment edits in memory until ``on-finish``).

Cost: :data:`HOLD` bytes of memory per upload, and fwup receives the last :data:`HOLD` bytes
when the upload ends instead of as they arrive (a few milliseconds of work for fwup).
A central directory larger than :data:`HOLD` (thousands of resources; fwup archives have a
handful) cannot be held back whole: such an archive is still applied when it is complete, and
the log says that a cut would not have been caught by this check.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

log = logging.getLogger(__name__)

__all__ = ["HOLD", "Holdback", "IncompleteArchive", "check_end", "check_start"]

HOLD = 256 * 1024

_LOCAL_HEADER = b"PK\x03\x04"
_CENTRAL_HEADER = b"PK\x01\x02"
_EOCD = struct.Struct("<4sHHHHIIH")  # signature, disk, cd disk, entries here, entries, cd size, cd offset, comment
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, zip64 eocd offset, disks
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_EOCD_SIG = b"PK\x06\x06"


class IncompleteArchive(Exception):
    """The upload is not a whole ``.fw`` archive; the message says what is wrong."""


def check_start(head: bytes) -> None:
    """The first bytes of an upload: a ``.fw`` starts with a zip local file header."""
    if len(head) >= 4 and head[:4] != _LOCAL_HEADER:
        shown = head[:8].hex(" ")
        raise IncompleteArchive(
            f"this is not a .fw file: a .fw is a zip archive starting with 50 4b 03 04, this upload starts with {shown}"
        )


def check_end(tail: bytes | bytearray | memoryview, total: int) -> int:
    """Check that the upload's last bytes (``tail``, of ``total`` bytes in all) end a zip archive.

    Returns how many bytes of the central directory and end records lie inside ``tail``'s
    window (for the log), or ``-1`` when the central directory starts before the window.
    Raises :class:`IncompleteArchive` when the upload does not end with a consistent
    end-of-central-directory record: it was cut, or something was appended.
    """
    tail = memoryview(tail).cast("B")
    base = total - len(tail)  # absolute offset of tail[0]
    if total == 0:
        raise IncompleteArchive("the upload is empty: send a .fw file")
    if total < _EOCD.size:
        raise IncompleteArchive(f"the upload ended after {total} bytes, before the end of the .fw archive")
    found = _find_eocd(tail)
    if found is None:
        raise IncompleteArchive(
            f"the upload ended after {total} bytes without the end of the .fw archive (no zip end record): "
            "it was cut short or is not a .fw file"
        )
    pos, (_, disk, cd_disk, _, entries, cd_size, cd_offset, _) = found
    end_of_cd = base + pos
    if 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        cd_size, cd_offset, entries, end_of_cd = _zip64(tail, base, pos)
    if disk != 0 or cd_disk != 0:
        raise IncompleteArchive("the .fw archive claims to span several disks; fwup archives never do")
    if cd_offset + cd_size != end_of_cd:
        raise IncompleteArchive(
            f"the .fw archive's end record does not match its contents (central directory at {cd_offset} + "
            f"{cd_size} bytes, record at {end_of_cd}): the upload was cut or altered"
        )
    rel = cd_offset - base
    if rel < 0:
        log.warning(
            "the .fw archive's central directory (%d bytes) is larger than the %d-byte hold-back window; "
            "a cut upload of this archive would not have been caught", cd_size, len(tail)
        )
        return -1
    if entries and bytes(tail[rel : rel + 4]) != _CENTRAL_HEADER:
        raise IncompleteArchive(
            f"the .fw archive's end record points at byte {cd_offset}, where there is no central directory"
        )
    return len(tail) - rel


def _find_eocd(tail: memoryview) -> tuple[int, tuple[bytes, int, int, int, int, int, int, int]] | None:
    """The end record whose comment reaches exactly to the end (search back over a comment)."""
    data = bytes(tail[-(_EOCD.size + 0xFFFF) :])
    offset = len(tail) - len(data)
    pos = data.rfind(_EOCD_SIG)
    while pos != -1:
        if pos + _EOCD.size <= len(data):
            fields = _EOCD.unpack_from(data, pos)
            if pos + _EOCD.size + fields[7] == len(data):
                return offset + pos, fields
        pos = data.rfind(_EOCD_SIG, 0, pos)
    return None


def _zip64(tail: memoryview, base: int, pos: int) -> tuple[int, int, int, int]:
    loc = pos - _ZIP64_LOCATOR.size
    if loc < 0 or bytes(tail[loc : loc + 4]) != _ZIP64_LOCATOR_SIG:
        raise IncompleteArchive("the .fw archive's zip64 end record is missing: the upload was cut or altered")
    _, _, record, _ = _ZIP64_LOCATOR.unpack_from(tail, loc)
    rel = record - base
    if rel < 0 or rel + _ZIP64_EOCD.size > loc or bytes(tail[rel : rel + 4]) != _ZIP64_EOCD_SIG:
        raise IncompleteArchive("the .fw archive's zip64 end record is not where its locator says")
    fields = _ZIP64_EOCD.unpack_from(tail, rel)
    return fields[8], fields[9], fields[7], record


class Holdback:
    """A FIFO that releases everything but its last ``size`` bytes.

    ``push(chunk)`` returns the pieces that may go on now (memoryviews of the chunks, no copy);
    ``tail()`` is what is held at the end.
    """

    def __init__(self, size: int = HOLD) -> None:
        self.size = size
        self.total = 0
        self._chunks: deque[memoryview] = deque()
        self._held = 0

    def push(self, data: bytes) -> list[memoryview]:
        if not data:
            return []
        self._chunks.append(memoryview(data).cast("B"))
        self._held += len(data)
        self.total += len(data)
        out: list[memoryview] = []
        excess = self._held - self.size
        while excess > 0:
            first = self._chunks[0]
            if len(first) <= excess:
                out.append(self._chunks.popleft())
                taken = len(first)
            else:
                out.append(first[:excess])
                self._chunks[0] = first[excess:]
                taken = excess
            self._held -= taken
            excess -= taken
        return out

    @property
    def held(self) -> int:
        return self._held

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes still held (for :func:`check_start` on a short upload)."""
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def tail(self) -> bytes:
        """Everything still held, as one buffer; the holdback is empty afterwards."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._held = 0
        return data
