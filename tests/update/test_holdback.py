"""The hold-back window and the end-of-archive check, on archives made by the real fwup."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import pytest

from sshfwup.update.holdback import HOLD, Holdback, IncompleteArchive, check_end, check_start

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "fwup-1.16"


def fed(chunks: list[bytes], size: int) -> tuple[bytes, bytes]:
    """(what was released, what is held) after pushing ``chunks`` through a holdback."""
    hb = Holdback(size)
    out = b"".join(bytes(piece) for chunk in chunks for piece in hb.push(chunk))
    return out, hb.tail()


@pytest.mark.parametrize("sizes", [[1] * 50, [7, 3, 100, 1, 0, 40], [1000], [5, 5, 5], [64, 64, 64, 64]])
def test_releases_everything_but_the_last_bytes_in_order(sizes: list[int]) -> None:
    data = os.urandom(sum(sizes))
    chunks, i = [], 0
    for n in sizes:
        chunks.append(data[i : i + n])
        i += n
    released, held = fed(chunks, 64)
    assert released + held == data
    assert held == data[-64:] if len(data) >= 64 else held == data


def test_push_does_not_copy_the_chunks() -> None:
    hb = Holdback(10)
    pieces = hb.push(b"x" * 100)
    assert [type(p) for p in pieces] == [memoryview] and len(pieces[0]) == 90 and hb.held == 10
    assert hb.head(4) == b"xxxx" and hb.total == 100


@pytest.mark.parametrize("name", ["v1.fw", "v2.fw", "v2-otherboard.fw"])
def test_a_whole_fwup_archive_passes(name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    check_start(data[:4])
    assert 0 < check_end(data, len(data)) < 400  # central directory + end record of 3 entries
    # the same with only the held window of a bigger upload
    assert check_end(data[-300:], len(data)) == check_end(data, len(data))


@pytest.mark.parametrize("name", ["v1.fw", "v2.fw"])
def test_every_truncation_of_a_real_archive_is_refused(name: str) -> None:
    data = (SAMPLES / name).read_bytes()
    for n in range(len(data)):
        with pytest.raises(IncompleteArchive):
            check_end(data[:n], n)


def test_appended_bytes_are_refused() -> None:
    data = (SAMPLES / "v2.fw").read_bytes()
    for extra in (b"\0", b"x" * 21, b"PK\x05\x06", os.urandom(5000)):
        with pytest.raises(IncompleteArchive, match="no zip end record|does not match"):
            check_end(data + extra, len(data) + len(extra))


def test_a_forged_end_record_is_refused() -> None:
    data = bytearray((SAMPLES / "v2.fw").read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    for field, offset in (("cd size", 12), ("cd offset", 16)):
        forged = bytearray(data)
        struct.pack_into("<I", forged, eocd + offset, struct.unpack_from("<I", forged, eocd + offset)[0] + 1)
        with pytest.raises(IncompleteArchive, match="does not match"):
            check_end(forged, len(forged))
    multi = bytearray(data)
    struct.pack_into("<H", multi, eocd + 4, 1)
    with pytest.raises(IncompleteArchive, match="several disks"):
        check_end(multi, len(multi))
    # a record that points where there is no central directory header
    moved = bytearray(data)
    cd = struct.unpack_from("<I", moved, eocd + 16)[0]
    moved[cd : cd + 4] = b"PK\x03\x04"
    with pytest.raises(IncompleteArchive, match="no central directory"):
        check_end(moved, len(moved))


def test_an_end_record_with_a_comment() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("meta.conf", b"x" * 100)
        z.comment = b"PK\x05\x06 a comment that holds the signature"
    data = buf.getvalue()
    assert check_end(data, len(data)) > 0
    with pytest.raises(IncompleteArchive):
        check_end(data[:-1], len(data) - 1)


def _with_zip64_end(data: bytes) -> bytes:
    """The same archive with a zip64 end record + locator and 0xFFFFFFFF in the classic record."""
    eocd = data.rfind(b"PK\x05\x06")
    _, _, _, n_here, n, cd_size, cd_offset, _ = struct.unpack_from("<4sHHHHIIH", data, eocd)
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, n_here, n, cd_size, cd_offset)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, eocd, 1)
    classic = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return data[:eocd] + record + locator + classic


def test_zip64_end_records() -> None:
    data = _with_zip64_end((SAMPLES / "v2.fw").read_bytes())
    assert check_end(data, len(data)) > 0
    for n in (len(data) - 1, len(data) - 22, len(data) - 30, len(data) - 60):
        with pytest.raises(IncompleteArchive):
            check_end(data[:n], n)
    broken = bytearray(data)
    broken[-42:-38] = b"XXXX"  # the locator's signature
    with pytest.raises(IncompleteArchive, match="zip64"):
        check_end(broken, len(broken))


def test_a_central_directory_larger_than_the_window_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = (SAMPLES / "v2.fw").read_bytes()
    assert check_end(data[-100:], len(data)) == -1  # the window holds only the end record
    assert "larger than the 100-byte hold-back window" in caplog.text


def test_the_start_of_an_upload() -> None:
    check_start(b"PK\x03\x04")
    check_start(b"PK")  # too short to tell yet
    for head in (b"\x7fELF", b"\x00\x00\x00\x00", b"PK\x05\x06", b"hsqs"):
        with pytest.raises(IncompleteArchive, match="not a .fw file"):
            check_start(head)


def test_empty_and_tiny_uploads() -> None:
    with pytest.raises(IncompleteArchive, match="empty"):
        check_end(b"", 0)
    with pytest.raises(IncompleteArchive, match="after 10 bytes"):
        check_end(b"PK\x03\x04" + bytes(6), 10)


def test_hold_is_bounded() -> None:
    assert 64 * 1024 <= HOLD <= 1024 * 1024
