"""``sshfwup firmware delta`` and the patch an uploader sends (``plan_upload``), on the build machine.

Applying patches with the real fwup on a simulated device is in tests/update/test_update.py.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sshfwup.host import firmware_delta
from sshfwup.firmware.archive import read_firmware
from sshfwup.firmware.keys import generate_keypair, load_private_key
from sshfwup.host.firmware_sign import sign_firmware
from sshfwup.host.firmware_build import build_firmware, reference_conf
from sshfwup.host.firmware_delta import DeltaError, make_patch, plan_upload, read_head_info
from sshfwup.firmware.delta_source import DeltaSource
from sshfwup.sim.rootfs import make_rootfs


def sshfwup(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sshfwup", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def rootfs_of(fw: Path) -> bytes:
    with zipfile.ZipFile(fw) as z:
        return z.read("data/rootfs.img")


def test_delta_cli_prints_the_sizes_and_writes_new_with_a_patched_rootfs(firmware, tmp_path: Path) -> None:
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    out = tmp_path / "patch.fw"
    result = sshfwup("firmware", "delta", v1, v2, "-o", out)
    assert result.returncode == 0, result.stderr
    full, delta = v2.stat().st_size, out.stat().st_size
    assert "full:   " in result.stdout and f"({full} bytes, {v2})" in result.stdout, result.stdout
    assert "delta:  " in result.stdout and f"({delta} bytes)" in result.stdout, result.stdout
    assert f"ratio:  {delta / full:.2%} of the full firmware" in result.stdout, result.stdout
    assert delta < full
    new, old = read_firmware(v2), read_firmware(v1)
    head = read_head_info(out)
    assert head.uuid == new.uuid and head.version == "2.0.0"  # NEW's identity: meta.conf verbatim
    assert head.delta_source == DeltaSource(old.uuid, "1.0.0")
    assert f"applies only to a device running 1.0.0 (uuid {old.uuid})" in result.stdout
    with zipfile.ZipFile(out) as p, zipfile.ZipFile(v2) as n:
        assert [i.filename for i in p.infolist()] == [i.filename for i in n.infolist()]
        assert p.read("meta.conf") == n.read("meta.conf") and p.testzip() is None
        patched = p.read("data/rootfs.img")
    assert patched != rootfs_of(v2) and len(patched) != new.meta.resources["rootfs.img"].length
    # what fwup decodes against the running slot is NEW's rootfs, byte for byte
    (tmp_path / "old.img").write_bytes(rootfs_of(v1))
    (tmp_path / "vcdiff").write_bytes(patched)
    decoded = subprocess.run(["xdelta3", "-d", "-c", "-s", str(tmp_path / "old.img"), str(tmp_path / "vcdiff")],
                             capture_output=True, check=True).stdout  # fmt: skip
    assert decoded == rootfs_of(v2)


def test_a_signed_new_keeps_its_signature(firmware, tmp_path: Path) -> None:
    from sshfwup.update.fwhead import read_head_bytes

    priv, pub = generate_keypair()
    (tmp_path / "k.priv").write_text(priv)
    (tmp_path / "k.pub").write_text(pub)
    v2s = sign_firmware(firmware("2.0.0"), tmp_path / "v2s.fw", load_private_key(tmp_path / "k.priv"))
    patch = make_patch(firmware("1.0.0"), v2s, tmp_path / "p.fw")
    head = read_head_bytes(patch.path.read_bytes(), public_keys=[tmp_path / "k.pub"], final=True)
    assert head is not None and head.signed and head.delta_source == patch.source
    other_priv, other_pub = generate_keypair()
    (tmp_path / "other.pub").write_text(other_pub)
    assert read_head_bytes(patch.path.read_bytes(), public_keys=[tmp_path / "other.pub"], final=True) is None


def conf_without_delta_settings(tmp_path: Path) -> Path:
    text = reference_conf().read_text()
    stripped = re.sub(r"^\s*delta-source-raw-(offset|count)=.*\n", "", text, flags=re.M)
    assert stripped != text
    out = tmp_path / "fwup-nodelta.conf"
    out.write_text(stripped)
    return out


@pytest.mark.parametrize("case", ["same", "old-is-a-patch", "new-is-a-patch", "other-platform", "no-delta-conf",
                                  "no-xdelta3", "missing-file"])  # fmt: skip
def test_refusals(firmware, tmp_path: Path, case: str) -> None:
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    old, new, env = v1, v2, None
    expected = {
        "same": "are the same firmware",
        "old-is-a-patch": "is itself a delta patch",
        "new-is-a-patch": "is itself a delta patch",
        "other-platform": "a device refuses firmware for another platform",
        "no-delta-conf": "no delta-source-raw-offset/-count in any task's on-resource rootfs.img",
        "no-xdelta3": "xdelta3 not found: install xdelta3",
        "missing-file": "no such file",
    }[case]
    if case == "same":
        new = v1
    elif case in ("old-is-a-patch", "new-is-a-patch"):
        patch = make_patch(v1, v2, tmp_path / "p.fw").path
        old, new = (patch, v2) if case == "old-is-a-patch" else (v1, patch)
    elif case == "other-platform":
        new = firmware("2.0.0", platform="otherboard")
    elif case == "no-delta-conf":
        staging = make_rootfs(tmp_path / "tree", version="2.0.0")
        new = build_firmware(staging, tmp_path / "nodelta.fw", version="2.0.0",
                             conf=conf_without_delta_settings(tmp_path))  # fmt: skip
    elif case == "no-xdelta3":
        env = {**os.environ, "PATH": str(tmp_path / "empty")}
    elif case == "missing-file":
        old = tmp_path / "gone.fw"
    out = tmp_path / "out.fw"
    result = sshfwup("firmware", "delta", old, new, "-o", out, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".sshfwup-delta-*"))


def test_info_and_diff_say_what_a_patch_is(firmware, tmp_path: Path) -> None:
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    patch = make_patch(v1, v2, tmp_path / "p.fw").path
    result = sshfwup("firmware", "info", patch)
    assert result.returncode == 1
    assert "is a delta patch to 2.0.0" in result.stderr and "running 1.0.0" in result.stderr, result.stderr


def test_diff_reports_the_patch_size(firmware, tmp_path: Path) -> None:
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    result = sshfwup("firmware", "diff", v1, v2, "--delta", "--json")
    assert result.returncode == 0, result.stderr
    delta = json.loads(result.stdout)["delta"]
    expected = make_patch(v1, v2, tmp_path / "p.fw")
    assert delta == {"patch_size": expected.size, "full_size": v2.stat().st_size,
                     "ratio": round(expected.ratio, 6), "resource": "rootfs.img"}  # fmt: skip
    text = sshfwup("firmware", "diff", v1, v2, "--delta").stdout
    assert re.search(r"^delta: +\S+ \S+ patch instead of \S+ \S+ \(\d+\.\d\d%\)$", text, re.M), text
    same = json.loads(sshfwup("firmware", "diff", v1, v1, "--delta", "--json").stdout)["delta"]
    assert "are the same firmware" in same["error"]
    assert "delta" not in sshfwup("firmware", "diff", v1, v2).stdout


# --- plan_upload: what an uploader sends ---------------------------------------------------------


@pytest.fixture
def releases(firmware, tmp_path: Path) -> Path:
    """A directory of released firmware, as a build server keeps it (and a stray patch)."""
    out = tmp_path / "releases"
    out.mkdir()
    for version, kwargs in (("0.9.0", {}), ("1.0.0", {})):
        (out / f"app-{version}.fw").write_bytes(firmware(version, **kwargs).read_bytes())
    make_patch(firmware("0.9.0"), firmware("1.0.0"), out / "app-0.9.0-to-1.0.0.fw")  # same uuid as 1.0.0
    (out / "notes.fw").write_text("not a firmware")
    return out


def test_plan_picks_the_running_firmware_and_caches_the_patch(firmware, releases: Path, tmp_path: Path) -> None:
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    running = read_firmware(v1).uuid
    cache = tmp_path / "cache"
    plan = plan_upload(v2, running, releases, cache_dir=cache)
    assert plan.delta and not plan.cached and plan.source == releases / "app-1.0.0.fw"
    assert plan.file.parent == cache and plan.size == plan.file.stat().st_size < plan.full_size == v2.stat().st_size
    assert read_head_info(plan.file).delta_source == DeltaSource(running, "1.0.0")
    assert "sending a delta patch 1.0.0 → 2.0.0" in plan.message and "(cached)" not in plan.message
    made = plan.file.stat().st_mtime_ns
    again = plan_upload(v2, running, releases, cache_dir=cache)
    assert again.delta and again.cached and again.file == plan.file and again.file.stat().st_mtime_ns == made
    assert "(cached)" in again.message
    # a damaged cache entry is made again, never sent
    data = bytearray(plan.file.read_bytes())
    data[-300] ^= 0xFF
    plan.file.write_bytes(bytes(data))
    fixed = plan_upload(v2, running, releases, cache_dir=cache)
    assert fixed.delta and not fixed.cached and fixed.file.read_bytes() == make_patch(
        v1, v2, tmp_path / "check.fw").path.read_bytes()


def test_plan_falls_back_to_the_full_image_with_a_reason(firmware, releases: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    cache = tmp_path / "cache"
    unknown = plan_upload(v2, "00000000-0000-5000-8000-000000000000", releases, cache_dir=cache)
    assert not unknown.delta and unknown.file == v2 and unknown.size == v2.stat().st_size
    assert "no .fw in" in unknown.message and "is the firmware the device runs" in unknown.message
    assert not unknown.delta and "no uuid" in plan_upload(v2, None, releases, cache_dir=cache).message
    current = plan_upload(v2, read_firmware(v2).uuid, releases, cache_dir=cache)
    assert not current.delta and "already runs 2.0.0" in current.message
    with pytest.raises(DeltaError, match="not a directory"):
        plan_upload(v2, None, tmp_path / "nowhere")
    assert not cache.exists()  # no patch was made for any of these
    monkeypatch.setattr(firmware_delta, "WORTH_IT", 0.01)  # a patch must now be < 1 % of the image
    big = plan_upload(v2, read_firmware(v1).uuid, releases, cache_dir=cache)
    assert not big.delta and big.file == v2 and big.source == releases / "app-1.0.0.fw"
    assert "not much smaller than" in big.message


# --- the patch archive as fwup reads it ---------------------------------------------------------------


def local_headers(data: bytes) -> dict[str, tuple[int, int, int, int, bytes]]:
    """name → (flags, CRC-32, compressed size, size, extra field) of every ZIP local header."""
    out = {}
    for m in re.finditer(rb"PK\x03\x04", data):
        flags, _, _, _, crc, csize, usize, nlen, xlen = struct.unpack_from("<HHHHIIIHH", data, m.start() + 6)
        name_end = m.start() + 30 + nlen
        out[data[m.start() + 30 : name_end].decode()] = (flags, crc, csize, usize, data[name_end : name_end + xlen])
    return out


def test_patch_entries_carry_sizes_and_the_source_field_in_their_local_headers(firmware, tmp_path: Path) -> None:
    """What ZipWriter(extra=, sizes_in_header=) was for, now written by zipfile: every local header
    holds its CRC and sizes (no data descriptors: fwup takes the patch by its local header size),
    the delta-source field follows the timestamp in the local and the central header, meta.conf
    keeps NEW's timestamp, and the device's stream reader and zipfile read the same entries."""
    from sshfwup.firmware.delta_source import DELTA_SOURCE_ID, encode_delta_source
    from sshfwup.firmware.zipstream import ZipStream

    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    patch = make_patch(v1, v2, tmp_path / "p.fw")
    data = patch.path.read_bytes()
    assert b"PK\x07\x08" not in data  # no data descriptors
    headers = local_headers(data)
    field_id, field = encode_delta_source(patch.source)
    source_field = struct.pack("<HH", field_id, len(field)) + field
    with zipfile.ZipFile(patch.path) as z, zipfile.ZipFile(v2) as n:
        assert z.testzip() is None
        for item in z.infolist():
            flags, crc, csize, usize, extra = headers[item.filename]
            assert flags & 0x08 == 0 and (crc, csize, usize) == (item.CRC, item.compress_size, item.file_size)
            assert extra[:4] == struct.pack("<HH", 0x5455, 5)  # the timestamp first
            assert (source_field in extra) == (item.filename == "data/rootfs.img")
            assert (source_field in item.extra) == (item.filename == "data/rootfs.img")
        assert z.getinfo("data/rootfs.img").file_size == len(z.read("data/rootfs.img")) != (
            read_firmware(v2).meta.resources["rootfs.img"].length)
        assert z.getinfo("meta.conf").date_time == n.getinfo("meta.conf").date_time
    stream = ZipStream(patch.path.open("rb").read)
    seen = []
    while (entry := stream.next_entry()) is not None:
        seen.append((entry.name, entry.extra_field(DELTA_SOURCE_ID), entry.size))
        stream.skip(entry)
    assert seen == [("meta.conf", None, len(read_firmware(v2).meta_conf)),
                    ("data/rootfs.img", field, len(zipfile.ZipFile(patch.path).read("data/rootfs.img")))]  # fmt: skip


@pytest.mark.parametrize("signed", [False, True])
def test_fwup_applies_the_patch_like_the_full_firmware(firmware, fwup: str, tmp_path: Path, signed: bool) -> None:
    """``fwup -V`` accepts the patch, and ``fwup -a -t upgrade`` over a slot holding OLD — from a
    file and from stdin, as a device gets it — leaves the disk exactly as NEW does; a signed NEW's
    patch also with the key required (-p)."""
    from sshfwup.sim.layout import Layout

    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    keys: list[str] = []
    if signed:
        assert subprocess.run([fwup, "-g", "-o", str(tmp_path / "k")], capture_output=True).returncode == 0
        v2 = sign_firmware(v2, tmp_path / "v2s.fw", tmp_path / "k.priv")
        keys = ["-p", str(tmp_path / "k.pub")]
    patch = make_patch(v1, v2, tmp_path / "p.fw").path
    check = subprocess.run([fwup, "-V", *keys, "-i", str(patch)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def upgraded(fw: Path, *, stdin: bool = False) -> bytes:
        disk = tmp_path / "disk.img"
        disk.write_bytes(b"")
        os.truncate(disk, Layout().disk_bytes)
        subprocess.run([fwup, "-a", "-d", str(disk), "-i", str(v1), "-t", "complete"], capture_output=True, check=True)
        with fw.open("rb") as f:
            argv = [fwup, "-a", *keys, "-d", str(disk), "-t", "upgrade"] + ([] if stdin else ["-i", str(fw)])
            result = subprocess.run(argv, stdin=f if stdin else None, capture_output=True, text=True)
        assert result.returncode == 0 and "Success!" in result.stdout, result.stdout + result.stderr
        return disk.read_bytes()

    full = upgraded(v2)
    assert upgraded(patch) == full and upgraded(patch, stdin=True) == full
