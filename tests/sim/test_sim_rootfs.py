"""Staging trees for sample firmware: deterministic, and different only where asked."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from sshfwup.firmware.manifest import MANIFEST_PATH, MARKER_PATH, load_manifest
from sshfwup.sim.rootfs import CHANGES, SAMPLE_APP, build_sample_firmware, make_rootfs


def tree_digest(root: Path) -> dict[str, tuple[str, int, int]]:
    """path → (sha256 or "dir", mode, mtime) for every entry of a tree."""
    out: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            host = Path(dirpath) / name
            st = host.lstat()
            content = "dir" if host.is_dir() else hashlib.sha256(host.read_bytes()).hexdigest()
            out["/" + host.relative_to(root).as_posix()] = (content, st.st_mode, int(st.st_mtime))
    return out


def manifest_of(root: Path) -> dict[str, object]:
    return dict(load_manifest(root / MANIFEST_PATH.lstrip("/")).entries)


def differing_paths(a: Path, b: Path) -> set[str]:
    ma, mb = manifest_of(a), manifest_of(b)
    return {p for p in ma.keys() | mb.keys() if ma.get(p) != mb.get(p)}


def test_baseline_tree_has_the_linux_like_files(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r", version="1.0.0")
    for path in (
        "/etc/os-release",
        "/etc/hostname",
        "/boot/zImage",
        "/boot/sim.dtb",
        "/lib/modules/6.1.0-sim/modules.dep",
        "/usr/bin/python3",
        "/usr/lib/python3.11/os.py",
        "/srv/app/app.py",
        "/srv/app/VERSION",
        "/srv/app/behavior.json",
        MANIFEST_PATH,
        MARKER_PATH,
    ):
        assert (root / path.lstrip("/")).is_file(), path
    assert (root / "srv/app/app.py").read_bytes() == SAMPLE_APP.read_bytes()
    assert (root / "srv/app/VERSION").read_text() == "1.0.0\n"
    assert (root / "boot/sim.dtb").read_bytes()[:4] == bytes.fromhex("d00dfeed")
    assert os.stat(root / "usr/bin/python3").st_mode & 0o777 == 0o755
    assert "1.0.0" not in (root / "etc/os-release").read_text()


def test_same_inputs_give_identical_trees(tmp_path: Path) -> None:
    kwargs = dict(version="1.2.3", changes=["kernel", "native-app"], app_behavior={"ready_delay": 0.2})
    a = make_rootfs(tmp_path / "a", **kwargs)
    b = make_rootfs(tmp_path / "b", **kwargs)
    assert tree_digest(a) == tree_digest(b)


def test_rebuilding_replaces_the_tree(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r", version="1.0.0", changes=["native-app"])
    make_rootfs(root, version="1.0.0")
    assert not (root / "srv/app/_speedups.so").exists()


def test_app_only_release_differs_only_in_the_app_version(tmp_path: Path) -> None:
    v1 = make_rootfs(tmp_path / "v1", version="1.0.0")
    v2 = make_rootfs(tmp_path / "v2", version="2.0.0")
    assert differing_paths(v1, v2) == {"/srv/app/VERSION"}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_change_differs_exactly_where_named(tmp_path: Path, change: str) -> None:
    v1 = make_rootfs(tmp_path / "v1", version="1.0.0")
    v2 = make_rootfs(tmp_path / "v2", version="2.0.0", changes=[change])
    assert differing_paths(v1, v2) == {"/srv/app/VERSION", CHANGES[change]}


def test_same_change_in_two_releases_still_differs(tmp_path: Path) -> None:
    v2 = make_rootfs(tmp_path / "v2", version="2.0.0", changes=["kernel"])
    v3 = make_rootfs(tmp_path / "v3", version="3.0.0", changes=["kernel"])
    assert differing_paths(v2, v3) == {"/srv/app/VERSION", "/boot/zImage"}


@pytest.mark.parametrize(("change", "path"), [("native-app", "/srv/app/_speedups.so"), ("app-executable", "/srv/app/helper")])
def test_native_changes_are_elf_and_flagged_native(tmp_path: Path, change: str, path: str) -> None:
    root = make_rootfs(tmp_path / "r", version="2.0.0", changes=[change])
    assert (root / path.lstrip("/")).read_bytes()[:4] == b"\x7fELF"
    assert manifest_of(root)[path].native is True  # type: ignore[attr-defined]


def test_manifest_records_kernel_dtb_and_app_dir(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r", version="1.0.0")
    manifest = load_manifest(root / MANIFEST_PATH.lstrip("/"))
    assert manifest.kernel == "/boot/zImage"
    assert manifest.dtbs == ("/boot/sim.dtb",)
    assert manifest.app_dirs == ("/srv/app",)


@pytest.mark.parametrize(("hot", "marker"), [(True, "true\n"), (False, "false\n"), (None, None)])
def test_marker(tmp_path: Path, hot: bool | None, marker: str | None) -> None:
    root = make_rootfs(tmp_path / "r", version="1.0.0", hot=hot)
    path = root / MARKER_PATH.lstrip("/")
    assert (path.read_text() if path.exists() else None) == marker


def test_marker_does_not_change_the_manifest(tmp_path: Path) -> None:
    hot = make_rootfs(tmp_path / "hot", version="1.0.0", hot=True)
    cold = make_rootfs(tmp_path / "cold", version="1.0.0", hot=False)
    assert differing_paths(hot, cold) == set()


def test_without_manifest(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r", version="1.0.0", manifest=False)
    assert not (root / MANIFEST_PATH.lstrip("/")).exists()
    assert (root / "srv/app/VERSION").exists()


def test_app_behavior_is_written(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "r", version="1.0.0", app_behavior={"crash_after": 1.5, "never_ready": True})
    assert json.loads((root / "srv/app/behavior.json").read_text()) == {"crash_after": 1.5, "never_ready": True}
    default = make_rootfs(tmp_path / "d", version="1.0.0")
    assert json.loads((default / "srv/app/behavior.json").read_text()) == {}


def test_unknown_change_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown rootfs change 'bootloader'"):
        make_rootfs(tmp_path / "r", version="1.0.0", changes=["bootloader"])


def test_sample_firmware_is_reproducible(tmp_path: Path) -> None:
    first = build_sample_firmware(tmp_path / "one", version="1.0.0", changes=["dtb"])
    second = build_sample_firmware(tmp_path / "two", version="1.0.0", changes=["dtb"])
    assert first.name == "1.0.0.fw"
    assert first.read_bytes() == second.read_bytes()
    other = build_sample_firmware(tmp_path / "one", version="2.0.0", name="v2")
    assert other.name == "v2.fw"
    assert other.read_bytes() != first.read_bytes()
