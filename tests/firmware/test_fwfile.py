"""sshfwup.fwfile against archives made and checked by the real fwup, and Python's zipfile."""

from __future__ import annotations

import base64
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from sshfwup.firmware.archive import extract_resource, firmware_uuid, read_firmware
from sshfwup.firmware.keys import generate_keypair, load_private_key, load_public_key, verify_signature
from sshfwup.firmware.metaconf import Call, UBootEnvironment, parse_meta_conf
from sshfwup.host.firmware_sign import sign_firmware
from sshfwup.firmware.errors import FirmwareError
from sshfwup.sim.firmware import SQUASHFS_TIME, reference_conf
from sshfwup.sim.layout import BLOCK_SIZE, Layout

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "fwup-1.16"  # real fwup output, see its README
DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "fwup.conf"


def sample_env(name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (SAMPLES / name).read_text().splitlines())


def local_headers(data: bytes) -> list[tuple[str, int, int, int]]:
    """(name, version needed, flags, method) of every ZIP local header, found independently."""
    out = []
    for m in re.finditer(rb"PK\x03\x04", data):
        version, flags, method = struct.unpack_from("<HHH", data, m.start() + 4)
        nlen = struct.unpack_from("<H", data, m.start() + 26)[0]
        out.append((data[m.start() + 30 : m.start() + 30 + nlen].decode(), version, flags, method))
    return out


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs.img"
    path.write_bytes(os.urandom(100_000) + bytes(300_000))  # part incompressible, part not
    return path


def fwup_create(fwup: str, rootfs: Path, out: Path, *args: str, version: str = "1.0.0") -> Path:
    """``fwup -c -f deploy/fwup.conf`` over ``rootfs`` (extra ``args``: e.g. ``-s KEY``)."""
    env = {**os.environ, "ROOTFS": str(rootfs), "NERVES_FW_VERSION": version, "SOURCE_DATE_EPOCH": str(SQUASHFS_TIME)}
    result = subprocess.run([fwup, "-c", "-f", str(reference_conf()), "-o", str(out), *args],
                            env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def run_fwup(fwup: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([fwup, *map(str, args)], capture_output=True, text=True, check=False)


@pytest.fixture
def fw(fwup: str, rootfs: Path, tmp_path: Path) -> Path:
    return fwup_create(fwup, rootfs, tmp_path / "fw.fw")


# --- the samples -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, env_file, slot", [("v1.fw", "env-after-complete.txt", "a"),
                                                  ("v2.fw", "env-after-upgrade.txt", "b")])
def test_uuid_matches_what_real_fwup_wrote_to_the_env(name: str, env_file: str, slot: str) -> None:
    meta_conf = zipfile.ZipFile(SAMPLES / name).read("meta.conf")
    assert firmware_uuid(meta_conf) == sample_env(env_file)[f"{slot}.nerves_fw_uuid"]
    assert read_firmware(SAMPLES / name).uuid == sample_env(env_file)[f"{slot}.nerves_fw_uuid"]


@pytest.mark.parametrize("name", ["v1.fw", "v2.fw", "v2-otherboard.fw"])
def test_read_firmware_on_real_archives(name: str) -> None:
    info = read_firmware(SAMPLES / name)
    with zipfile.ZipFile(SAMPLES / name) as z:
        assert [(e.name, e.compressed_size, e.size) for e in info.entries] == [
            (i.filename, i.compress_size, i.file_size) for i in z.infolist()
        ]
        assert info.meta_conf == z.read("meta.conf")
    assert info.signature is None
    assert info.meta.meta["platform"] == ("otherboard" if "other" in name else "sampleboard")
    assert info.version == ("1.0.0" if name == "v1.fw" else "2.0.0")


def test_metadata_matches_fwup_m_output() -> None:
    """What the stream reader makes of an archive is what ``fwup -m`` prints (the host asks fwup
    for its metadata; the device reads it from the upload's first bytes)."""
    from sshfwup.update.fwup import parse_metadata

    info = read_firmware(SAMPLES / "v2.fw")
    printed = parse_metadata((SAMPLES / "fwup-metadata-v2.txt").read_text())
    assert printed["uuid"] == info.uuid and printed["creation-date"] == info.creation_date
    meta_fields = {k: v for k, v in printed.items() if k not in ("uuid", "creation-date", "nickname")}
    assert meta_fields and meta_fields == {k: info.meta.meta[k] for k in meta_fields}


@pytest.mark.parametrize(
    "name, operator_words",
    [("garbage.bin", "not a firmware archive"),
     ("half.fw", "truncated firmware archive"),
     ("flipped.fw", "corrupt firmware archive")],
)
def test_bad_samples_raise_clear_errors(name: str, operator_words: str) -> None:
    with pytest.raises(FirmwareError) as err:
        read_firmware(SAMPLES / name)
    assert operator_words in str(err.value) and name in str(err.value)


def test_parse_meta_conf_of_a_real_archive() -> None:
    raw = zipfile.ZipFile(SAMPLES / "v2.fw").read("meta.conf").decode()
    meta = parse_meta_conf(raw)
    assert list(meta.tasks) == ["complete", "upgrade.a", "upgrade.b", "upgrade.unvalidated",
                                "upgrade.unexpected", "upgrade.wrongplatform"]
    upgrade_b = meta.tasks["upgrade.b"]
    assert upgrade_b.requirements[0] == Call("require-uboot-variable", ("uboot-env", "nerves_fw_active", "a"))
    assert upgrade_b.requirements[-1] == Call("require-partition-offset", ("2", "24576"))
    assert upgrade_b.on_init[0] == Call("info", ("Upgrading partition B",))
    assert upgrade_b.on_resource["rootfs.img"] == (Call("raw_write", ("24576",)),)
    assert Call("uboot_setenv", ("uboot-env", "b.nerves_fw_uuid", "${FWUP_META_UUID}")) in upgrade_b.on_finish
    assert meta.tasks["complete"].require_unmounted_destination
    assert meta.uboot_env["uboot-env"] == UBootEnvironment("uboot-env", 256, 16)
    assert [(p.index, p.block_offset, p.type, p.boot, p.expand) for p in meta.mbrs["mbr"].partitions] == [
        (0, 2048, 0x0C, True, False), (1, 8192, 0x83, False, False),
        (2, 24576, 0x83, False, False), (3, 40960, 0x83, False, True),
    ]  # fmt: skip
    assert meta.resources["rootfs.img"].length == 4096
    assert meta.require_fwup_version == "1.0.0"



def zip_with(tmp_path: Path, entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """An archive written by Python's zipfile: sizes in the local headers, no data descriptors."""
    path = tmp_path / "py.fw"
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in entries:
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_reader_handles_sizes_in_the_local_header(tmp_path: Path, rootfs: Path, fw: Path, method: int) -> None:
    text = zipfile.ZipFile(fw).read("meta.conf").decode()
    path = zip_with(tmp_path, [("meta.conf", text.encode()), ("data/rootfs.img", rootfs.read_bytes())], method)
    assert local_headers(path.read_bytes())[0][2] & 0x08 == 0
    info = read_firmware(path)
    assert info.entries[1].size == rootfs.stat().st_size and info.meta_conf == text.encode()


def test_altered_resource_with_a_valid_crc_fails_the_hash(tmp_path: Path, rootfs: Path, fw: Path) -> None:
    text = zipfile.ZipFile(fw).read("meta.conf").decode()
    data = bytearray(rootfs.read_bytes())
    data[1234] ^= 0xFF
    path = zip_with(tmp_path, [("meta.conf", text.encode()), ("data/rootfs.img", bytes(data))])
    with pytest.raises(FirmwareError, match="does not match its blake2b-256"):
        read_firmware(path)
    with pytest.raises(FirmwareError):
        extract_resource(path, "rootfs.img", tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    shorter = zip_with(tmp_path, [("meta.conf", text.encode()), ("data/rootfs.img", bytes(data[:-1]))])
    with pytest.raises(FirmwareError, match="meta.conf says"):
        read_firmware(shorter)


def test_a_flipped_byte_in_deflated_data_is_caught(fwup: str, fw: Path) -> None:
    data = bytearray(fw.read_bytes())
    start = read_firmware(fw).entries[-1].data_offset
    data[start + 500] ^= 0x01
    fw.write_bytes(bytes(data))
    with pytest.raises(FirmwareError, match="corrupt firmware archive"):
        read_firmware(fw)
    assert run_fwup(fwup, "-V", "-i", fw).returncode != 0  # and fwup agrees


def test_truncation_inside_a_resource(tmp_path: Path, fw: Path) -> None:
    data = fw.read_bytes()
    (tmp_path / "cut.fw").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(FirmwareError, match="truncated"):
        read_firmware(tmp_path / "cut.fw")
    (tmp_path / "empty.fw").write_bytes(b"")
    with pytest.raises(FirmwareError, match="empty"):
        read_firmware(tmp_path / "empty.fw")


# --- keys and signatures -----------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv_text, pub_text = generate_keypair()
    priv, pub = tmp_path / "fwup-key.priv", tmp_path / "fwup-key.pub"
    priv.write_text(priv_text)
    pub.write_text(pub_text)
    return priv, pub


def test_key_files_have_fwups_format(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    raw_priv = base64.b64decode(priv.read_bytes(), validate=True)
    raw_pub = base64.b64decode(pub.read_bytes(), validate=True)
    assert len(raw_priv) == 64 and len(raw_pub) == 32 and raw_priv[32:] == raw_pub  # libsodium: seed + public
    assert load_private_key(priv) == raw_priv and load_public_key(pub) == raw_pub
    pub.write_text("not a key")
    with pytest.raises(FirmwareError, match="not an fwup public key"):
        load_public_key(pub)


def test_archives_signed_by_real_fwup_are_read(fwup: str, tmp_path: Path, rootfs: Path, fw: Path) -> None:
    """fwup -g keys; fwup -S (sign an archive) and fwup -c -s (sign while creating): libarchive stores
    meta.conf.ed25519 with sizes in the header and a data descriptor; both read and verify."""
    assert run_fwup(fwup, "-g", "-o", tmp_path / "real").returncode == 0
    priv, pub = tmp_path / "real.priv", tmp_path / "real.pub"
    signed_after = tmp_path / "S.fw"
    assert run_fwup(fwup, "-S", "-s", priv, "-i", fw, "-o", signed_after).returncode == 0
    signed_at_create = fwup_create(fwup, rootfs, tmp_path / "cs.fw", "-s", str(priv))
    for path in (signed_after, signed_at_create):
        headers = local_headers(path.read_bytes())
        assert headers[0][0] == "meta.conf.ed25519" and headers[0][2] & 0x08 and headers[0][3] == 0
        info = read_firmware(path, public_keys=[pub])
        assert info.signature is not None and verify_signature(info, load_public_key(pub))
        assert [e.name for e in info.entries][:2] == ["meta.conf.ed25519", "meta.conf"]
    assert read_firmware(signed_after).uuid == read_firmware(fw).uuid  # signing keeps the uuid


def test_our_signature_is_accepted_by_real_fwup(
    fwup: str, tmp_path: Path, fw: Path, rootfs: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    signed = sign_firmware(fw, tmp_path / "signed.fw", priv)
    check = run_fwup(fwup, "-V", "-p", pub, "-i", signed)
    assert check.returncode == 0 and "good signature" in check.stdout, check.stdout + check.stderr
    assert run_fwup(fwup, "-m", "-i", signed).stdout == run_fwup(fwup, "-m", "-i", fw).stdout  # same uuid, same date
    # entry timestamps survive signing; the signature entry is dated as fwup -c -s dates it
    times = {i.filename: i.date_time for i in zipfile.ZipFile(fw).infolist()}
    signed_times = {i.filename: i.date_time for i in zipfile.ZipFile(signed).infolist()}
    assert all(signed_times[name] == when for name, when in times.items())
    signed_at_create = zipfile.ZipFile(fwup_create(fwup, rootfs, tmp_path / "cs.fw", "-s", str(priv)))
    assert signed_times["meta.conf.ed25519"] == signed_at_create.getinfo("meta.conf.ed25519").date_time
    assert time.strptime("2023", "%Y")[:1] == (signed_times["meta.conf"][0],)  # SOURCE_DATE_EPOCH, not 1980
    # fwup applies it with the key required (-a -p): to a scratch image with the complete task
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, Layout().disk_bytes)
    applied = run_fwup(fwup, "-a", "-p", pub, "-d", image, "-i", signed, "-t", "complete")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    # resigning with another key replaces the signature
    other_priv, other_pub = tmp_path / "o.priv", tmp_path / "o.pub"
    p2, b2 = generate_keypair()
    other_priv.write_text(p2)
    other_pub.write_text(b2)
    replaced = sign_firmware(signed, tmp_path / "replaced.fw", other_priv)
    read_firmware(replaced, public_keys=[other_pub])
    assert run_fwup(fwup, "-V", "-p", other_pub, "-i", replaced).returncode == 0


def _tampered_meta(src: Path, dst: Path) -> Path:
    """Same signature, meta.conf changed by one character (zip CRCs recomputed: only the signature tells)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for item in z.infolist():
            data = z.read(item.filename)
            out.writestr(item.filename, data.replace(b"1.0.0", b"1.0.1", 1) if item.filename == "meta.conf" else data)
    return dst


def test_bad_signatures_are_refused_by_both(fwup: str, tmp_path: Path, fw: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    signed = sign_firmware(fw, tmp_path / "signed.fw", priv)
    wrong_priv, wrong_pub = generate_keypair()
    (tmp_path / "wrong.pub").write_text(wrong_pub)
    flipped = tmp_path / "flipped.fw"
    data = bytearray(signed.read_bytes())
    data[read_firmware(signed).entries[-1].data_offset + 300] ^= 0x40
    flipped.write_bytes(bytes(data))
    cases = {
        "wrong key": (signed, tmp_path / "wrong.pub", "does not match any trusted public key"),
        "unsigned": (fw, pub, "not signed"),
        "tampered meta.conf": (_tampered_meta(signed, tmp_path / "tampered.fw"), pub, "signature does not match"),
        "flipped byte": (flipped, pub, "corrupt firmware archive"),
    }
    for case, (path, key, words) in cases.items():
        with pytest.raises(FirmwareError, match=words):
            read_firmware(path, public_keys=[key])
        assert run_fwup(fwup, "-V", "-p", key, "-i", path).returncode != 0, case
    read_firmware(signed, public_keys=[tmp_path / "wrong.pub", pub])  # any trusted key will do


# --- deploy/fwup.conf and the simulator's layout ----------------------------------------------


def test_deploy_fwup_conf_uses_the_layout_numbers() -> None:
    text = DEPLOY_CONF.read_text()
    layout = Layout()
    for name, value in [("UBOOT_ENV_OFFSET", layout.uboot_env_offset), ("UBOOT_ENV_COUNT", layout.uboot_env_count),
                        ("ROOTFS_A_PART_OFFSET", layout.rootfs_a_offset), ("ROOTFS_A_PART_COUNT", layout.rootfs_count),
                        ("APP_PART_COUNT", layout.app_count)]:
        assert f"define({name}, {value})" in text
    assert f'define(NERVES_FW_PLATFORM, "{layout.platform}")' in text
    assert layout.app_offset * BLOCK_SIZE + layout.app_count * BLOCK_SIZE == layout.disk_bytes


def test_the_sims_conf_is_the_shipped_one() -> None:
    assert reference_conf() == DEPLOY_CONF


# --- signing either way ------------------------------------------------------------------------------
# (ZipWriter's extra fields and sizes in the local header are checked through the delta patch that
# needs them, which zipfile now writes: tests/host/test_firmware_delta.py)


@pytest.mark.parametrize("key_source", ["fwup -g", "keys gen"])
def test_signed_either_way_verifies_everywhere_with_the_same_signature(
    fwup: str, tmp_path: Path, fw: Path, rootfs: Path, keys: tuple[Path, Path], key_source: str
) -> None:
    """One key, one unsigned archive, signed by ``sshfwup firmware sign``, by ``fwup -S`` and by
    ``fwup -c -s`` (the same meta.conf): each verifies with ``fwup -V -p PUB`` and with
    ``sshfwup firmware info --public-key PUB``, and each holds the same meta.conf.ed25519 bytes —
    also the bytes the device's verifier (cryptography's ed25519) computes over meta.conf."""
    from sshfwup.firmware.keys import as_private_key
    from sshfwup.host import firmware

    if key_source == "fwup -g":
        assert run_fwup(fwup, "-g", "-o", tmp_path / "g").returncode == 0
        priv, pub = tmp_path / "g.priv", tmp_path / "g.pub"
    else:
        priv, pub = keys
    ours = tmp_path / "ours.fw"
    assert firmware.main(["firmware", "sign", str(fw), "--private-key", str(priv), "-o", str(ours)]) == 0
    by_fwup_s = tmp_path / "S.fw"
    assert run_fwup(fwup, "-S", "-s", priv, "-i", fw, "-o", by_fwup_s).returncode == 0
    by_fwup_cs = fwup_create(fwup, rootfs, tmp_path / "cs.fw", "-s", str(priv))
    signatures = set()
    for path in (ours, by_fwup_s, by_fwup_cs):
        check = run_fwup(fwup, "-V", "-p", pub, "-i", path)
        assert check.returncode == 0 and "good signature" in check.stdout, (path, check.stdout + check.stderr)
        info = subprocess.run([sys.executable, "-m", "sshfwup", "firmware", "info", str(path), "--public-key", str(pub)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert info.returncode == 0 and f"signature:     valid ({pub})" in info.stdout, info.stdout + info.stderr
        with zipfile.ZipFile(path) as z:
            assert z.read("meta.conf") == zipfile.ZipFile(fw).read("meta.conf")
            signatures.add(z.read("meta.conf.ed25519"))
    meta_conf = zipfile.ZipFile(fw).read("meta.conf")
    assert signatures == {as_private_key(priv).sign(meta_conf)}  # ed25519 is deterministic
    # and a wrong key is refused by both
    wrong_priv, wrong_pub = generate_keypair()
    (tmp_path / "wrong.pub").write_text(wrong_pub)
    assert run_fwup(fwup, "-V", "-p", tmp_path / "wrong.pub", "-i", ours).returncode != 0
    refused = subprocess.run([sys.executable, "-m", "sshfwup", "firmware", "info", str(ours),
                              "--public-key", str(tmp_path / "wrong.pub")], capture_output=True, text=True)  # fmt: skip
    assert refused.returncode == 1 and "INVALID for every given public key" in refused.stdout
