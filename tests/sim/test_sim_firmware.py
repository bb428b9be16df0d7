"""The sim's firmware builder: real mksquashfs, real fwup -c, a loop-mounted slot."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sshfwup.firmware.archive import read_firmware
from sshfwup.firmware.keys import generate_keypair
from sshfwup.firmware.errors import FirmwareError
from sshfwup.sim.firmware import build_firmware, build_squashfs
from sshfwup.sim.layout import DEFAULT_LAYOUT



@pytest.fixture
def staging(tmp_path: Path) -> Path:
    root = tmp_path / "staging"
    (root / "srv" / "app").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "srv" / "app" / "VERSION").write_text("1.0.0\n")
    (root / "srv" / "app" / "app.py").write_text("print('hello')\n")
    (root / "srv" / "app" / "run").write_text("#!/bin/sh\n")
    (root / "srv" / "app" / "run").chmod(0o755)
    (root / "etc" / "hostname").write_text("sim\n")
    (root / "srv" / "link").symlink_to("app/VERSION")
    return root


def tree(root: Path) -> dict[str, tuple[str, bytes | str, int]]:
    """path → (kind, content or link target, permission bits), for comparing two trees."""
    out: dict[str, tuple[str, bytes | str, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path), 0)
        elif path.is_dir():
            out[rel] = ("dir", "", path.stat().st_mode & 0o7777)
        else:
            out[rel] = ("file", path.read_bytes(), path.stat().st_mode & 0o7777)
    return out


def test_squashfs_is_reproducible(staging: Path, tmp_path: Path) -> None:
    first = build_squashfs(staging, tmp_path / "one.img").read_bytes()
    os.utime(staging / "etc" / "hostname", (1234567, 1234567))  # timestamps must not matter
    second = build_squashfs(staging, tmp_path / "two.img").read_bytes()
    assert first == second and first[:4] == b"hsqs"
    (staging / "etc" / "hostname").write_text("other\n")
    assert build_squashfs(staging, tmp_path / "three.img").read_bytes() != first


@pytest.fixture
def loop_mount(tmp_path: Path) -> Iterator[Callable[[Path, int, int], Path]]:
    """mount(image, offset, size) → a read-only mount point; everything is undone afterwards."""
    mounts: list[Path] = []
    loops: list[str] = []

    def mount(image: Path, offset: int, size: int) -> Path:
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", "--offset", str(offset), "--sizelimit", str(size),
             str(image)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        loops.append(loop)
        point = tmp_path / f"mnt{len(mounts)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid", loop, str(point)], check=True)
        mounts.append(point)
        return point

    try:
        yield mount
    finally:
        problems = []
        for point in reversed(mounts):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                problems.append(f"umount {point}")
        for loop in loops:
            if subprocess.run(["losetup", "--detach", loop], capture_output=True).returncode != 0:
                problems.append(f"losetup -d {loop}")
        assert not problems, problems


def test_built_firmware_applies_and_its_slot_mounts(
    staging: Path, tmp_path: Path, loop_mount: Callable[[Path, int, int], Path], fwup: str
) -> None:
    fw = build_firmware(staging, tmp_path / "fw" / "v1.fw", version="1.0.0")
    info = read_firmware(fw)
    assert info.version == "1.0.0" and info.platform == DEFAULT_LAYOUT.platform
    assert info.meta.meta["author"] == "sshfwup sim"
    assert [e.name for e in info.entries] == ["meta.conf", "data/rootfs.img"]
    assert sorted(p.name for p in fw.parent.iterdir()) == ["v1.fw"]  # no build leftovers

    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DEFAULT_LAYOUT.disk_bytes)
    result = subprocess.run([fwup, "-a", "-d", str(image), "-i", str(fw), "-t", "complete"], capture_output=True)
    assert result.returncode == 0, result.stdout
    mounted = loop_mount(image, *DEFAULT_LAYOUT.slot_span("a"))
    assert tree(mounted) == tree(staging)
    assert all(st.st_uid == 0 and st.st_gid == 0 for st in (p.lstat() for p in mounted.rglob("*")))


def test_same_tree_same_firmware(staging: Path, tmp_path: Path, fwup: str) -> None:
    one = build_firmware(staging, tmp_path / "one.fw", version="2.0.0")
    two = build_firmware(staging, tmp_path / "two.fw", version="2.0.0")
    assert one.read_bytes() == two.read_bytes()
    other = build_firmware(staging, tmp_path / "other.fw", version="2.0.0", platform="otherboard")
    assert read_firmware(other).platform == "otherboard"
    assert read_firmware(other).uuid != read_firmware(one).uuid


def test_signed_build(staging: Path, tmp_path: Path, fwup: str) -> None:
    priv, pub = generate_keypair()
    (tmp_path / "fwup-key.priv").write_text(priv)
    (tmp_path / "fwup-key.pub").write_text(pub)
    fw = build_firmware(staging, tmp_path / "signed.fw", version="1.0.0", signing_key=tmp_path / "fwup-key.priv")
    info = read_firmware(fw, public_keys=[tmp_path / "fwup-key.pub"])
    assert info.signature is not None


def test_refuses_a_rootfs_larger_than_a_slot(staging: Path, tmp_path: Path, fwup: str) -> None:
    (staging / "big.bin").write_bytes(os.urandom(64 * 1024))
    tiny = {"ROOTFS_A_PART_COUNT": "16"}  # 8 KiB slots: deploy/fwup.conf's assert-size-lte refuses
    with pytest.raises(FirmwareError, match="size assertion failed"):
        build_firmware(staging, tmp_path / "big.fw", version="1.0.0", variables=tiny)
    assert list(tmp_path.glob("*.fw")) == [] and list(tmp_path.glob(".sshfwup-build-*")) == []


def test_clear_errors_without_mksquashfs_or_staging(staging: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FirmwareError, match="staging tree not found"):
        build_squashfs(tmp_path / "missing", tmp_path / "x.img")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(FirmwareError, match="not found"):
        build_firmware(staging, tmp_path / "x.fw", version="1.0.0")
    with pytest.raises(FirmwareError, match="fwup not found.*FWUP_SOURCE"):
        build_firmware(staging, tmp_path / "x.fw", version="1.0.0", fwup="no-such-fwup")
