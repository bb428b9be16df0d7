"""``sshfwup firmware build``: manifest + marker, reproducible squashfs, real ``fwup -c``; refusals."""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sshfwup.firmware.archive import read_firmware
from sshfwup.firmware.keys import verify_signature
from sshfwup.host.firmware_build import build_squashfs
from sshfwup.host.firmware_image import read_rootfs_view
from sshfwup.firmware.manifest import load_manifest


def sshfwup(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sshfwup", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, check=False)  # fmt: skip


def noise(seed: str, size: int) -> bytes:
    """Incompressible bytes: mksquashfs stores their blocks as they are, so they can be found."""
    return random.Random(seed).randbytes(size)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    for path, content in {
        "etc/hostname": b"device\n",
        "etc/big.conf": noise("etc", 150_000),
        "usr/lib/libbig.so": noise("usr", 150_000),
        "srv/app/app.py": b"print('hello')\n",
        "srv/app/model.bin": noise("app", 150_000),
        "boot/zImage": b"KERNEL" * 100,
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    return root


def test_build_writes_manifest_and_marker_and_a_firmware_fwup_reads(tree: Path, tmp_path: Path, fwup: str) -> None:
    out = tmp_path / "out" / "app.fw"
    result = sshfwup("firmware", "build", tree, "-o", out, "--version", "3.1.0", "--hot", "--kernel", "/boot/zImage")
    assert result.returncode == 0, result.stderr
    assert f"built {out}: 3.1.0 (uuid " in result.stdout and "HOT_RELOAD true" in result.stdout, result.stdout
    assert (tree / "srv/app/HOT_RELOAD").read_text().strip() == "true"
    manifest = load_manifest(tree / "usr/share/sshfwup/manifest.json")
    assert manifest.kernel == "/boot/zImage" and manifest.app_dirs == ("/srv/app",)
    assert "/srv/app/app.py" in manifest.entries and "/srv/app/HOT_RELOAD" not in manifest.entries
    check = subprocess.run([fwup, "-V", "-i", str(out)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    info = read_firmware(out)
    assert info.version == "3.1.0" and info.platform == "sshfwup-sim" and info.signature is None
    assert f"uuid {info.uuid}" in result.stdout
    view = read_rootfs_view(out, info)  # what the device reads from the slot
    assert view.marker is True and view.manifest == manifest


def test_two_builds_of_one_tree_are_identical(tree: Path, tmp_path: Path, fwup: str) -> None:
    first, second, changed = tmp_path / "1.fw", tmp_path / "2.fw", tmp_path / "3.fw"
    assert sshfwup("firmware", "build", tree, "-o", first, "--version", "1.0.0").returncode == 0
    os.utime(tree / "etc" / "hostname", (1234567, 1234567))  # timestamps and build time must not matter
    # (and the second build finds the manifest and its folder that the first one wrote)
    assert sshfwup("firmware", "build", tree, "-o", second, "--version", "1.0.0").returncode == 0
    assert first.read_bytes() == second.read_bytes()
    (tree / "srv/app/app.py").write_text("print('changed')\n")
    assert sshfwup("firmware", "build", tree, "-o", changed, "--version", "1.0.0").returncode == 0
    assert changed.read_bytes() != first.read_bytes()


def test_the_app_and_etc_are_stored_last(tree: Path, tmp_path: Path) -> None:
    """A file that changes size moves every file stored after it: the app's data goes last,
    /etc's just before it, so an app change moves nothing else (small deltas)."""
    image = build_squashfs(tree, tmp_path / "rootfs.img").read_bytes()
    where = {name: image.find(noise(name, 150_000)[:4096]) for name in ("usr", "etc", "app")}
    assert all(offset > 0 for offset in where.values()), where
    assert where["usr"] < where["etc"] < where["app"], where
    plain = build_squashfs(tree, tmp_path / "plain.img", last=()).read_bytes()  # mksquashfs's own order
    assert plain.find(noise("app", 150_000)[:4096]) < plain.find(noise("usr", 150_000)[:4096])


def test_signed_build(tree: Path, tmp_path: Path, fwup: str) -> None:
    keys = subprocess.run([fwup, "-g"], cwd=tmp_path, capture_output=True, check=False)
    assert keys.returncode == 0
    out = tmp_path / "signed.fw"
    result = sshfwup("firmware", "build", tree, "-o", out, "--sign", tmp_path / "fwup-key.priv")
    assert result.returncode == 0 and ", signed" in result.stdout, result.stdout + result.stderr
    public = base64.b64decode((tmp_path / "fwup-key.pub").read_text())
    assert verify_signature(read_firmware(out), public)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-tree", "not a directory (expected the staging root filesystem)"),
        ("no-fwup", "fwup not found: install fwup"),
        ("no-app-dir", "app directory /opt/app is not in"),
        ("default-app-dir-missing", "app directory /srv/app is not in"),
        ("no-conf", "fwup configuration not found"),
        ("no-key", "signing key not found"),
        ("bad-define", "--define SIZE: expected NAME=VALUE"),
        ("rootfs-too-big", "size assertion failed"),  # fwup -c's own refusal, passed on
    ],
)
def test_refusals(tree: Path, tmp_path: Path, fwup: str, case: str, message: str) -> None:
    out = tmp_path / "out.fw"
    args: list[str | Path] = ["firmware", "build", tree, "-o", out]
    env = None
    if case == "missing-tree":
        args[2] = tmp_path / "nowhere"
    elif case == "no-fwup":
        bin_dir = tmp_path / "bin"  # mksquashfs but no fwup
        bin_dir.mkdir()
        (bin_dir / "mksquashfs").symlink_to("/usr/bin/mksquashfs")
        env = {**os.environ, "PATH": str(bin_dir)}
    elif case == "no-app-dir":
        args += ["--app-dir", "/opt/app"]
    elif case == "default-app-dir-missing":
        (tree / "srv/app/app.py").unlink()
        (tree / "srv/app/model.bin").unlink()
        (tree / "srv/app").rmdir()
    elif case == "no-conf":
        args += ["--fwup-conf", tmp_path / "nope.conf"]
    elif case == "no-key":
        args += ["--sign", tmp_path / "nope.priv"]
    elif case == "bad-define":
        args += ["--define", "SIZE"]
    elif case == "rootfs-too-big":
        args += ["--define", "ROOTFS_A_PART_COUNT=16"]  # 8 KiB slots
    result = sshfwup(*args, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert not out.exists() and not list(tmp_path.glob(".sshfwup-*"))
    if case in ("missing-tree", "no-fwup", "no-app-dir", "no-conf", "no-key"):  # refused before writing anything
        assert not (tree / "usr/share/sshfwup/manifest.json").exists()


# --- the kernel and device trees: found in the tree, recorded, or warned about ----------------------


def test_find_boot_files_in_the_usual_places(tmp_path: Path) -> None:
    from sshfwup.host.firmware_bootfiles import find_boot_files

    root = tmp_path / "rootfs"
    for path in ("boot/vmlinuz-6.1.0-17-arm64", "boot/vmlinuz-6.1.0-18-arm64", "boot/board.dtb",
                 "boot/dtbs/vendor/b.dtb", "boot/dtbs/overlays/o.dtbo", "boot/dtbs/README",
                 "usr/lib/linux-image-6.1.0-18-arm64/vendor/c.dtb", "lib/modules/6.1.0-18-arm64/modules.dep"):  # fmt: skip
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"x")
    outside = tmp_path / "host.dtb"
    outside.write_bytes(b"x")
    (root / "boot/dtbs/link.dtb").symlink_to(outside)  # never followed: not the device's file
    (root / "vmlinuz").symlink_to("boot/vmlinuz-6.1.0-18-arm64")
    found = find_boot_files(root)
    assert found.kernel == "/boot/vmlinuz-6.1.0-18-arm64"  # the one /lib/modules has modules for
    assert found.kernels == ("/boot/vmlinuz-6.1.0-17-arm64", "/boot/vmlinuz-6.1.0-18-arm64")
    assert found.dtbs == ("/boot/board.dtb", "/boot/dtbs/overlays/o.dtbo", "/boot/dtbs/vendor/b.dtb",
                          "/usr/lib/linux-image-6.1.0-18-arm64/vendor/c.dtb")  # fmt: skip
    (root / "lib/modules/6.1.0-17-arm64").mkdir()  # now both have modules: no pick
    again = find_boot_files(root)
    assert again.kernel is None and again.ambiguous
    empty = find_boot_files(tmp_path / "nothing")
    assert empty.kernel is None and empty.dtbs == () and not empty.ambiguous


@pytest.mark.parametrize(
    ("boot", "found", "warned"),
    [
        ({"boot/zImage": b"K", "boot/board.dtb": b"D"}, "kernel /boot/zImage; device tree /boot/board.dtb", None),
        ({"boot/Image": b"K"}, "kernel /boot/Image; no device tree", "no device tree"),
        ({}, "no kernel; no device tree", "no kernel and no device tree"),
    ],
    ids=["both", "kernel-only", "none"],
)
def test_build_records_what_it_finds_and_warns_a_hot_build_without_it(
    tree: Path, tmp_path: Path, fwup: str, boot: dict[str, bytes], found: str, warned: str | None
) -> None:
    (tree / "boot/zImage").unlink()
    for path, content in boot.items():
        (tree / path).write_bytes(content)
    out = tmp_path / "app.fw"
    result = sshfwup("firmware", "build", tree, "-o", out, "--version", "4.0.0", "--hot")
    assert result.returncode == 0, result.stderr
    options = "--kernel/--dtb name them" if warned and "no kernel" in warned else "recorded; --kernel/--dtb name others"
    assert f"found in {tree}: {found} ({options})" in result.stdout, result.stdout
    manifest = load_manifest(tree / "usr/share/sshfwup/manifest.json")
    assert manifest.kernel == next((f"/{p}" for p in boot if "Image" in p), None)
    assert manifest.dtbs == tuple(f"/{p}" for p in boot if p.endswith(".dtb"))
    if warned is None:
        assert result.stderr == "", result.stderr
    else:
        assert f"sshfwup: warning: marked hot, but this build records {warned}: a device" in result.stderr, result.stderr
        assert "will refuse the hot swap and require a reboot" in result.stderr
        assert ("--kernel PATH --dtb PATH" if "kernel" in warned else "Name them: --dtb PATH") in result.stderr
        assert result.stderr.count("sshfwup: ") == 1, result.stderr  # one warning (two lines)
    # told where they are, it records those and looks for nothing
    (tmp_path / "k").write_bytes(b"K")
    told = sshfwup("firmware", "build", tree, "-o", out, "--hot", "--kernel", tmp_path / "k", "--dtb", tmp_path / "k")
    assert told.returncode == 0 and "found in" not in told.stdout and told.stderr == "", told.stdout + told.stderr
    # a build not marked hot is not warned
    plain = sshfwup("firmware", "build", tree, "-o", out, "--reboot")
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
