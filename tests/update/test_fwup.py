"""The fwup protocol layer against real bytes captured from fwup 1.16."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from sshfwup.update.fwup import (
    Failure,
    FrameDecoder,
    FwupError,
    Message,
    Progress,
    Success,
    TextRenderer,
    decode_frames,
    encode_frame,
    parse_event,
    parse_metadata,
)

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "fwup-1.16"  # real fwup 1.16 output, see its README


def _decoded_txt(name: str) -> list[tuple[str, int, str]]:
    """The reference decoding next to each sample: ``len=N TYPE code=C msg='…'`` or ``progress=P``."""
    out = []
    for line in (SAMPLES / name).read_text().splitlines():
        parts = line.split(" ", 2)
        kind = parts[1]
        if kind == "PR":
            out.append((kind, int(parts[2].split("=")[1]), ""))
        else:
            code_part, msg_part = parts[2].split(" ", 1)
            out.append((kind, int(code_part.split("=")[1]), msg_part.split("=", 1)[1][1:-1]))
    return out


@pytest.mark.parametrize("case", ["v2", "garbage", "half", "flipped", "v2-otherboard", "again-unvalidated"])
def test_decoder_matches_reference_decoding(case: str) -> None:
    events = decode_frames((SAMPLES / f"upgrade-{case}.framed.bin").read_bytes())
    expected = _decoded_txt(f"upgrade-{case}.framed.decoded.txt")
    got = []
    for e in events:
        if isinstance(e, Progress):
            got.append(("PR", e.percent, ""))
        elif isinstance(e, Message):
            got.append(("WN", 0, e.text))
        elif isinstance(e, Failure):
            got.append(("ER", e.code, e.text))
        else:
            got.append(("OK", e.code, e.text))
    assert got == expected


def test_decoder_survives_any_split() -> None:
    data = (SAMPLES / "upgrade-v2.framed.bin").read_bytes()
    whole = decode_frames(data)
    for step in (1, 3, 7, 64):
        d = FrameDecoder()
        events = []
        for i in range(0, len(data), step):
            events += [parse_event(p) for p in d.feed(data[i : i + step])]
        assert events == whole and d.pending == 0


def test_renderer_matches_fwup_text_output() -> None:
    """Our rendering of the framed events says what fwup's own text mode said."""
    for case in ("v2", "garbage", "v2-otherboard"):
        events = decode_frames((SAMPLES / f"upgrade-{case}.framed.bin").read_bytes())
        r = TextRenderer()
        ours = "".join(r.render(e) for e in events)
        theirs = (SAMPLES / f"upgrade-{case}.text.bin").read_bytes()[:-2].decode()  # minus 0x1a+status
        for line in theirs.split("\n"):
            visible = line.split("\r")[-1].replace("\x1b[K", "").strip()
            visible = visible.split("]")[0] + "]" if visible.endswith("\x08") else visible  # bar, minus byte counts
            if visible and not visible.startswith("Elapsed time"):
                assert visible in ours, f"{case}: fwup said {visible!r}; we render {ours!r}"
    r = TextRenderer()
    assert r.render(Progress(4)).startswith("\r  4% [=")
    assert r.render(Progress(4)) == ""  # unchanged percentages are not redrawn
    assert r.render(Message("Upgrading partition B")) == "\r\x1b[Kfwup: Upgrading partition B\n"
    assert r.render(Success()) == "Success!\n"
    r.render(Progress(100))
    assert r.render(Success()) == "\nSuccess!\n"  # a finished bar stays, as in fwup's output


def test_broken_streams_are_errors() -> None:
    with pytest.raises(FwupError, match="ends inside a packet"):
        decode_frames(encode_frame(b"PR\x00\x05") + b"PR")
    with pytest.raises(FwupError, match="unknown packet type"):
        decode_frames(encode_frame(b"ZZ\x00\x00") + b"ZZ\x00\x00")
    with pytest.raises(FwupError, match="at least 4"):
        decode_frames(encode_frame(b"P") + b"P")
    with pytest.raises(FwupError, match="not framed"):
        FrameDecoder().feed(b"Unrecognized archive format")
    assert encode_frame(b"") == struct.pack(">I", 0)


def test_metadata_parser_on_real_output() -> None:
    meta = parse_metadata((SAMPLES / "fwup-metadata-v2.txt").read_text())
    assert meta["product"] == "Sample Product"
    assert meta["version"] == "2.0.0"
    assert meta["platform"] == "sampleboard"
    assert meta["uuid"] == "23467865-22b0-52db-8307-f50ab5e756c3"
    assert parse_metadata('meta-misc="a \\"quoted\\" word"\n')["misc"] == 'a "quoted" word'
