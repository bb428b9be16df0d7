"""sshfwup.fwfile against real fwup 1.16 archives, Python's zipfile, and libubootenv's tools."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import operator
import os
import re
import shutil
import struct
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from sshfwup import fwfile
from sshfwup.fwfile import FirmwareError
from sshfwup.sim.layout import BLOCK_SIZE, DEFAULT_LAYOUT, Layout

SAMPLES = Path(__file__).resolve().parent / "data" / "fwup-1.16"  # real fwup output, see its README
DEPLOY_CONF = Path(__file__).resolve().parents[1] / "deploy" / "fwup.conf"


def sample_env(name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (SAMPLES / name).read_text().splitlines())


def real_fwup_error(case: str) -> str:
    """The ER text real fwup printed for a sample (from its reference decoding)."""
    text = (SAMPLES / f"upgrade-{case}.framed.decoded.txt").read_text()
    return re.search(r"ER code=0 msg='(.*)'", text).group(1)  # type: ignore[union-attr]


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


def compiled(rootfs: Path, version: str = "1.0.0", **kwargs: str) -> str:
    data = rootfs.read_bytes()
    return fwfile.compile_meta_conf(
        DEFAULT_LAYOUT, version=version, rootfs_length=len(data),
        rootfs_blake2b=hashlib.blake2b(data, digest_size=32).hexdigest(), **kwargs,
    )  # fmt: skip


# --- the samples -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, env_file, slot", [("v1.fw", "env-after-complete.txt", "a"),
                                                  ("v2.fw", "env-after-upgrade.txt", "b")])
def test_uuid_matches_what_real_fwup_wrote_to_the_env(name: str, env_file: str, slot: str) -> None:
    meta_conf = zipfile.ZipFile(SAMPLES / name).read("meta.conf")
    assert fwfile.firmware_uuid(meta_conf) == sample_env(env_file)[f"{slot}.nerves_fw_uuid"]
    assert fwfile.read_firmware(SAMPLES / name).uuid == sample_env(env_file)[f"{slot}.nerves_fw_uuid"]


@pytest.mark.parametrize("name", ["v1.fw", "v2.fw", "v2-otherboard.fw"])
def test_read_firmware_on_real_archives(name: str) -> None:
    info = fwfile.read_firmware(SAMPLES / name)
    with zipfile.ZipFile(SAMPLES / name) as z:
        assert [(e.name, e.compressed_size, e.size) for e in info.entries] == [
            (i.filename, i.compress_size, i.file_size) for i in z.infolist()
        ]
        assert info.meta_conf == z.read("meta.conf")
    assert info.signature is None
    assert info.meta.meta["platform"] == ("otherboard" if "other" in name else "sampleboard")
    assert info.version == ("1.0.0" if name == "v1.fw" else "2.0.0")


def test_metadata_matches_fwup_m_output() -> None:
    info = fwfile.read_firmware(SAMPLES / "v2.fw")
    expected = [line for line in (SAMPLES / "fwup-metadata-v2.txt").read_text().splitlines()
                if not line.startswith("meta-nickname=")]
    assert fwfile.format_metadata(info.metadata).splitlines() == expected


@pytest.mark.parametrize(
    "name, operator_words, case",
    [("garbage.bin", "not a firmware archive", "garbage"),
     ("half.fw", "truncated firmware archive", "half"),
     ("flipped.fw", "corrupt firmware archive", "flipped")],
)
def test_bad_samples_raise_clear_errors(name: str, operator_words: str, case: str) -> None:
    with pytest.raises(FirmwareError) as err:
        fwfile.read_firmware(SAMPLES / name)
    assert operator_words in str(err.value) and name in str(err.value)
    assert err.value.fwup_message == real_fwup_error(case)


def test_parse_meta_conf_of_a_real_archive() -> None:
    raw = zipfile.ZipFile(SAMPLES / "v2.fw").read("meta.conf").decode()
    meta = fwfile.parse_meta_conf(raw)
    assert list(meta.tasks) == ["complete", "upgrade.a", "upgrade.b", "upgrade.unvalidated",
                                "upgrade.unexpected", "upgrade.wrongplatform"]
    upgrade_b = meta.tasks["upgrade.b"]
    assert upgrade_b.requirements[0] == fwfile.Call("require-uboot-variable", ("uboot-env", "nerves_fw_active", "a"))
    assert upgrade_b.requirements[-1] == fwfile.Call("require-partition-offset", ("2", "24576"))
    assert upgrade_b.on_init[0] == fwfile.Call("info", ("Upgrading partition B",))
    assert upgrade_b.on_resource["rootfs.img"] == (fwfile.Call("raw_write", ("24576",)),)
    assert fwfile.Call("uboot_setenv", ("uboot-env", "b.nerves_fw_uuid", "${FWUP_META_UUID}")) in upgrade_b.on_finish
    assert meta.tasks["complete"].require_unmounted_destination
    assert meta.uboot_env["uboot-env"] == fwfile.UBootEnvironment("uboot-env", 256, 16)
    assert [(p.index, p.block_offset, p.type, p.boot, p.expand) for p in meta.mbrs["mbr"].partitions] == [
        (0, 2048, 0x0C, True, False), (1, 8192, 0x83, False, False),
        (2, 24576, 0x83, False, False), (3, 40960, 0x83, False, True),
    ]  # fmt: skip
    assert meta.resources["rootfs.img"].length == 4096
    assert meta.require_fwup_version == "1.0.0"


@pytest.mark.parametrize("name", ["v1.fw", "v2.fw", "v2-otherboard.fw"])
def test_printing_a_parsed_meta_conf_gives_fwups_exact_bytes(name: str) -> None:
    raw = zipfile.ZipFile(SAMPLES / name).read("meta.conf").decode()
    assert fwfile.format_conf(fwfile.parse_conf(raw)) == raw


def test_our_archives_are_laid_out_like_fwups(tmp_path: Path, rootfs: Path) -> None:
    ours = fwfile.write_firmware(tmp_path / "x.fw", compiled(rootfs), {"rootfs.img": rootfs}).read_bytes()
    theirs = (SAMPLES / "v2.fw").read_bytes()
    # fwup: deflate, data descriptor (flag 0x08), "version needed" 2.0, meta.conf first
    assert {h[1:] for h in local_headers(theirs)} == {h[1:] for h in local_headers(ours)} == {(20, 0x08, 8)}
    assert [h[0] for h in local_headers(ours)] == ["meta.conf", "data/rootfs.img"]
    assert zipfile.ZipFile(io.BytesIO(ours)).testzip() is None  # central directory agrees


# --- compile → write → read -------------------------------------------------------------------


def test_compile_write_read_round_trip(tmp_path: Path, rootfs: Path) -> None:
    text = compiled(rootfs, "1.2.3", description="round trip", vcs_identifier="abc123")
    out = fwfile.write_firmware(tmp_path / "fw.fw", text, {"rootfs.img": rootfs})
    info = fwfile.read_firmware(out)
    assert info.meta_conf == text.encode()
    assert info.uuid == fwfile.firmware_uuid(text.encode())
    assert info.metadata["version"] == "1.2.3" and info.metadata["vcs-identifier"] == "abc123"
    assert info.platform == DEFAULT_LAYOUT.platform and info.architecture == DEFAULT_LAYOUT.architecture
    assert [e.name for e in info.entries] == ["meta.conf", "data/rootfs.img"]
    assert info.entries[1].size == rootfs.stat().st_size
    assert b"".join(fwfile.iter_resource(out, "rootfs.img")) == rootfs.read_bytes()
    extracted = fwfile.extract_resource(out, "rootfs.img", tmp_path / "copy.img")
    assert extracted.read_bytes() == rootfs.read_bytes()
    # and an independent reader sees the same contents
    with zipfile.ZipFile(out) as z:
        assert z.read("data/rootfs.img") == rootfs.read_bytes() and z.read("meta.conf") == text.encode()
    # deterministic: same inputs, same bytes
    again = fwfile.write_firmware(tmp_path / "again.fw", text, {"rootfs.img": rootfs})
    assert again.read_bytes() == out.read_bytes()


def test_compiled_meta_conf_for_the_sim_layout(rootfs: Path) -> None:
    meta = fwfile.parse_meta_conf(compiled(rootfs))
    layout = DEFAULT_LAYOUT
    assert list(meta.tasks) == ["complete", "upgrade.a", "upgrade.b", "upgrade.unvalidated",
                                "upgrade.unexpected", "upgrade.wrongplatform"]
    assert list(meta.resources) == ["rootfs.img"]  # no zImage: the kernel is in the rootfs
    parts = meta.mbrs["mbr"].partitions
    assert [(p.block_offset, p.block_count, p.expand) for p in parts] == [
        (layout.rootfs_a_offset, layout.rootfs_count, False),
        (layout.rootfs_b_offset, layout.rootfs_count, False),
        (layout.app_offset, layout.app_count, True),
    ]
    assert meta.uboot_env["uboot-env"].block_offset == layout.uboot_env_offset
    up_b = meta.tasks["upgrade.b"]
    assert up_b.on_resource["rootfs.img"] == (fwfile.Call("raw_write", (str(layout.rootfs_b_offset),)),)
    assert fwfile.Call("require-partition-offset", ("1", str(layout.rootfs_b_offset))) in up_b.requirements
    finish = {c.args[1]: c.args[2] for c in up_b.on_finish if c.name == "uboot_setenv"}
    assert finish["nerves_fw_active"] == "b" and finish["nerves_fw_validated"] == "0"
    assert finish["upgrade_available"] == "1" and finish["b.nerves_fw_uuid"] == "${FWUP_META_UUID}"
    # the switch happens only in on-finish: on-init touches only b's own identity
    assert all(c.args[1].startswith("b.") for c in up_b.on_init if c.name.startswith("uboot_"))
    complete = {c.args[1]: c.args[2] for c in meta.tasks["complete"].on_init if c.name == "uboot_setenv"}
    assert complete["nerves_fw_active"] == "a" and complete["nerves_fw_validated"] == "1"
    assert complete["bootlimit"] == "3" and complete["a.nerves_fw_version"] == "1.0.0"


def test_compile_refuses_a_rootfs_larger_than_a_slot() -> None:
    with pytest.raises(FirmwareError, match="slot holds"):
        fwfile.compile_meta_conf(DEFAULT_LAYOUT, version="1", rootfs_length=DEFAULT_LAYOUT.rootfs_count * 512 + 1,
                                 rootfs_blake2b="0" * 64)


def test_write_refuses_resources_that_do_not_match_meta_conf(tmp_path: Path, rootfs: Path) -> None:
    text = compiled(rootfs)
    other = tmp_path / "other.img"
    other.write_bytes(b"x" * 100)
    with pytest.raises(FirmwareError, match="does not match file-resource"):
        fwfile.write_firmware(tmp_path / "bad.fw", text, {"rootfs.img": other})
    with pytest.raises(FirmwareError, match="no file for rootfs.img"):
        fwfile.write_firmware(tmp_path / "bad.fw", text, {})
    assert not (tmp_path / "bad.fw").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def zip_with(tmp_path: Path, entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """An archive written by Python's zipfile: sizes in the local headers, no data descriptors."""
    path = tmp_path / "py.fw"
    with zipfile.ZipFile(path, "w", compression=method) as z:
        for name, data in entries:
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_reader_handles_sizes_in_the_local_header(tmp_path: Path, rootfs: Path, method: int) -> None:
    text = compiled(rootfs)
    path = zip_with(tmp_path, [("meta.conf", text.encode()), ("data/rootfs.img", rootfs.read_bytes())], method)
    assert local_headers(path.read_bytes())[0][2] & 0x08 == 0
    info = fwfile.read_firmware(path)
    assert info.entries[1].size == rootfs.stat().st_size and info.meta_conf == text.encode()


def test_altered_resource_with_a_valid_crc_fails_the_hash(tmp_path: Path, rootfs: Path) -> None:
    text = compiled(rootfs)
    data = bytearray(rootfs.read_bytes())
    data[1234] ^= 0xFF
    path = zip_with(tmp_path, [("meta.conf", text.encode()), ("data/rootfs.img", bytes(data))])
    with pytest.raises(FirmwareError, match="does not match its blake2b-256") as err:
        fwfile.read_firmware(path)
    assert err.value.fwup_message == "Detected blake2b digest mismatch for rootfs.img"
    with pytest.raises(FirmwareError):
        fwfile.extract_resource(path, "rootfs.img", tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()
    shorter = zip_with(tmp_path, [("meta.conf", text.encode()), ("data/rootfs.img", bytes(data[:-1]))])
    with pytest.raises(FirmwareError, match="meta.conf says"):
        fwfile.read_firmware(shorter)


def test_a_flipped_byte_in_deflated_data_is_caught(tmp_path: Path, rootfs: Path) -> None:
    path = fwfile.write_firmware(tmp_path / "fw.fw", compiled(rootfs), {"rootfs.img": rootfs})
    data = bytearray(path.read_bytes())
    start = fwfile.read_firmware(path).entries[1].data_offset
    data[start + 500] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FirmwareError) as err:
        fwfile.read_firmware(path)
    assert re.fullmatch(r"ZIP (bad CRC|decompression failed \(-?\d+\))", err.value.fwup_message)


def test_truncation_inside_a_resource(tmp_path: Path, rootfs: Path) -> None:
    path = fwfile.write_firmware(tmp_path / "fw.fw", compiled(rootfs), {"rootfs.img": rootfs})
    data = path.read_bytes()
    (tmp_path / "cut.fw").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(FirmwareError, match="truncated") as err:
        fwfile.read_firmware(tmp_path / "cut.fw")
    assert err.value.fwup_message == "ZIP decompression failed (-5)"  # what fwup 1.16 said (FACTS.md)
    (tmp_path / "empty.fw").write_bytes(b"")
    with pytest.raises(FirmwareError, match="empty"):
        fwfile.read_firmware(tmp_path / "empty.fw")


# --- keys and signatures -----------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv_text, pub_text = fwfile.generate_keypair()
    priv, pub = tmp_path / "fwup-key.priv", tmp_path / "fwup-key.pub"
    priv.write_text(priv_text)
    pub.write_text(pub_text)
    return priv, pub


def test_key_files_have_fwups_format(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    raw_priv = base64.b64decode(priv.read_bytes(), validate=True)
    raw_pub = base64.b64decode(pub.read_bytes(), validate=True)
    assert len(raw_priv) == 64 and len(raw_pub) == 32 and raw_priv[32:] == raw_pub  # libsodium: seed + public
    assert fwfile.load_private_key(priv) == raw_priv and fwfile.load_public_key(pub) == raw_pub
    pub.write_text("not a key")
    with pytest.raises(FirmwareError, match="not an fwup public key"):
        fwfile.load_public_key(pub)


def test_signing_round_trip(tmp_path: Path, rootfs: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    text = compiled(rootfs)
    signed = fwfile.write_firmware(tmp_path / "signed.fw", text, {"rootfs.img": rootfs}, signing_key=priv)
    info = fwfile.read_firmware(signed, public_keys=[pub])
    assert info.signature is not None and len(info.signature) == 64
    assert fwfile.verify_signature(info, fwfile.load_public_key(pub))
    assert [e.name for e in info.entries][:2] == ["meta.conf.ed25519", "meta.conf"]
    assert info.uuid == fwfile.firmware_uuid(text.encode())  # the signature does not change the uuid

    wrong_priv, wrong_pub = fwfile.generate_keypair()
    (tmp_path / "wrong.pub").write_text(wrong_pub)
    assert not fwfile.verify_signature(info, tmp_path / "wrong.pub")
    with pytest.raises(FirmwareError, match="does not match any trusted public key") as err:
        fwfile.read_firmware(signed, public_keys=[tmp_path / "wrong.pub"])
    assert err.value.fwup_message == "Firmware archive's meta.conf fails digital signature verification."
    fwfile.read_firmware(signed, public_keys=[tmp_path / "wrong.pub", pub])  # any trusted key will do

    unsigned = fwfile.write_firmware(tmp_path / "unsigned.fw", text, {"rootfs.img": rootfs})
    with pytest.raises(FirmwareError, match="not signed") as err:
        fwfile.read_firmware(unsigned, public_keys=[pub])
    assert err.value.fwup_message == "Expecting signed firmware archive."

    # altered payload: same signature, meta.conf changed by one character
    with zipfile.ZipFile(signed) as z:
        sig, meta = z.read("meta.conf.ed25519"), z.read("meta.conf")
    tampered = zip_with(tmp_path, [("meta.conf.ed25519", sig), ("meta.conf", meta.replace(b"1.0.0", b"1.0.1", 1)),
                                   ("data/rootfs.img", rootfs.read_bytes())])
    with pytest.raises(FirmwareError, match="signature does not match"):
        fwfile.read_firmware(tampered, public_keys=[pub])

    # signing an existing archive afterwards gives the same signed archive
    resigned = fwfile.sign_firmware(unsigned, tmp_path / "resigned.fw", priv)
    assert resigned.read_bytes() == signed.read_bytes()
    (tmp_path / "wrong.priv").write_text(wrong_priv)
    replaced = fwfile.sign_firmware(signed, tmp_path / "replaced.fw", tmp_path / "wrong.priv")
    fwfile.read_firmware(replaced, public_keys=[tmp_path / "wrong.pub"])
    with pytest.raises(FirmwareError):
        fwfile.read_firmware(replaced, public_keys=[pub])


# --- U-Boot environment blocks with the real libubootenv tools --------------------------------


@pytest.fixture
def env_image(tmp_path: Path) -> tuple[Path, Path]:
    if not shutil.which("fw_printenv") or not shutil.which("fw_setenv"):
        pytest.fail("fw_printenv/fw_setenv (libubootenv-tool) are required")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (0x100000 + 0x20000))
    config = tmp_path / "fw_env.config"
    config.write_text(f"{image} 0x100000 0x20000\n")
    return image, config


def test_env_block_we_write_is_read_by_fw_printenv(env_image: tuple[Path, Path]) -> None:
    image, config = env_image
    env = {"nerves_fw_active": "a", "b.nerves_fw_version": "2.0.0", "empty": "", "spaces": "x y = z"}
    with image.open("r+b") as f:
        f.seek(0x100000)
        f.write(fwfile.write_uboot_env(0x20000, env))
    out = subprocess.run(["fw_printenv", "-c", str(config)], capture_output=True, text=True, check=True).stdout
    assert dict(line.split("=", 1) for line in out.splitlines()) == env


def test_env_block_written_by_fw_setenv_is_parsed(env_image: tuple[Path, Path]) -> None:
    image, config = env_image
    with image.open("r+b") as f:
        f.seek(0x100000)
        f.write(fwfile.write_uboot_env(0x20000, {"bootcount": "0", "nerves_fw_active": "a"}))
    subprocess.run(["fw_setenv", "-c", str(config), "nerves_fw_active", "b"], check=True, capture_output=True)
    subprocess.run(["fw_setenv", "-c", str(config), "bootcount"], check=True, capture_output=True)  # unset
    subprocess.run(["fw_setenv", "-c", str(config), "new_var", "hello world"], check=True, capture_output=True)
    block = image.read_bytes()[0x100000 : 0x100000 + 0x20000]
    assert fwfile.parse_uboot_env(block) == {"nerves_fw_active": "b", "new_var": "hello world"}
    corrupt = bytearray(block)
    corrupt[10] ^= 1
    with pytest.raises(fwfile.UBootEnvError, match="CRC32 mismatch"):
        fwfile.parse_uboot_env(bytes(corrupt))


def test_env_block_layout_and_limits() -> None:
    block = fwfile.write_uboot_env(64, {"b": "2", "a": "1"})
    assert len(block) == 64 and block[4:13] == b"a=1\0b=2\0\0" and set(block[13:]) == {0xFF}
    with pytest.raises(fwfile.UBootEnvError, match="needs"):
        fwfile.write_uboot_env(16, {"long": "x" * 20})
    with pytest.raises(fwfile.UBootEnvError):
        fwfile.write_uboot_env(64, {"a=b": "1"})


# --- deploy/fwup.conf says what compile_meta_conf() compiles ----------------------------------

_OPS: dict[type, Callable[[int, int], int]] = {ast.Add: operator.add, ast.Sub: operator.sub,
                                               ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _arith(text: str) -> int:
    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(f"unsupported define-eval expression {text!r}")

    return ev(ast.parse(text, mode="eval").body)


def compile_source(text: str, environ: dict[str, str], resource: Path) -> str:
    """A small structural reading of fwup's source syntax, shaped like `fwup -c`'s meta.conf.

    define() sets a variable unless the environment has it; ${VAR} expands; function calls
    in a task become its reqlist and its sections' funlists. A file-resource gets the length
    and hash of ``resource`` (fwup -c computes them from host-path).
    """
    data = resource.read_bytes()
    resource_items = (fwfile.ConfOption("length", str(len(data))),
                      fwfile.ConfOption("blake2b-256", hashlib.blake2b(data, digest_size=32).hexdigest()))
    defs = dict(environ)
    x = lambda s: fwfile.expand_variables(s, defs)  # noqa: E731

    def section(sec: fwfile.ConfSection) -> fwfile.ConfSection:
        items: list = list(resource_items) if sec.name == "file-resource" else []
        calls = [i for i in sec.items if isinstance(i, fwfile.ConfCall)]
        if calls:
            flat = tuple(v for c in calls for v in (str(len(c.args) + 1), c.name, *map(x, c.args)))
            items.append(fwfile.ConfOption("reqlist" if sec.name == "task" else "funlist", flat))
        for item in sec.items:
            if isinstance(item, fwfile.ConfOption) and sec.name != "file-resource":
                items.append(fwfile.ConfOption(item.name, x(item.value)))  # type: ignore[arg-type]
            elif isinstance(item, fwfile.ConfSection):
                items.append(section(item))
        return fwfile.ConfSection(sec.name, x(sec.title) if sec.title else None, tuple(items))

    out: list = []
    for item in fwfile.parse_conf(text).items:
        if isinstance(item, fwfile.ConfCall) and item.name in ("define", "define-eval"):
            name, value = item.args
            if name not in defs:
                defs[name] = str(_arith(x(value))) if item.name == "define-eval" else x(value)
        elif isinstance(item, fwfile.ConfOption):
            if x(item.value):  # type: ignore[arg-type]
                out.append(fwfile.ConfOption(item.name, x(item.value)))  # type: ignore[arg-type]
        elif isinstance(item, fwfile.ConfSection):
            out.append(section(item))
    return fwfile.format_conf(fwfile.ConfSection("", None, tuple(out)))


def test_deploy_fwup_conf_agrees_with_compile_meta_conf(rootfs: Path) -> None:
    source = compile_source(DEPLOY_CONF.read_text(), {"NERVES_FW_VERSION": "3.1.4"}, rootfs)
    ours = fwfile.parse_meta_conf(compiled(rootfs, "3.1.4", author="sshfwup sim"))  # build_firmware's default
    theirs = fwfile.parse_meta_conf(source)
    assert dict(theirs.meta) == dict(ours.meta)
    assert theirs.require_fwup_version == ours.require_fwup_version
    assert theirs.resources == ours.resources
    assert theirs.mbrs == ours.mbrs and theirs.uboot_env == ours.uboot_env
    assert list(theirs.tasks) == list(ours.tasks)
    for name, task in ours.tasks.items():
        assert theirs.tasks[name] == task, name

    def on_resource_options(meta: fwfile.MetaConf) -> list:
        return [(t.title, sorted((i.name, i.value) for r in t.sections("on-resource") for i in r.items))
                for t in meta.root.sections("task")]

    assert on_resource_options(theirs) == on_resource_options(ours)


def test_deploy_fwup_conf_uses_the_layout_numbers() -> None:
    text = DEPLOY_CONF.read_text()
    layout = Layout()
    for name, value in [("UBOOT_ENV_OFFSET", layout.uboot_env_offset), ("UBOOT_ENV_COUNT", layout.uboot_env_count),
                        ("ROOTFS_A_PART_OFFSET", layout.rootfs_a_offset), ("ROOTFS_A_PART_COUNT", layout.rootfs_count),
                        ("APP_PART_COUNT", layout.app_count)]:
        assert f"define({name}, {value})" in text
    assert f'define(NERVES_FW_PLATFORM, "{layout.platform}")' in text
    assert layout.app_offset * BLOCK_SIZE + layout.app_count * BLOCK_SIZE == layout.disk_bytes
