"""sshfwup.firmware.manifest: building, writing, reading the rootfs manifest and the HOT_RELOAD marker."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from sshfwup.firmware.manifest import (
    FORMAT,
    MANIFEST_PATH,
    MARKER_PATH,
    Entry,
    Manifest,
    ManifestError,
    build_manifest,
    dump_manifest,
    inside,
    is_native,
    load_manifest,
    native_by_content,
    read_marker,
    read_rootfs_file,
    resolve_in_root,
    write_manifest,
    write_marker,
)

ELF = b"\x7fELF\x02\x01\x01" + bytes(64)


def put(root: Path, path: str, data: bytes = b"", mode: int = 0o644) -> Path:
    host = root / path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(data)
    os.chmod(host, mode)
    return host


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    put(root, "/srv/app/app.py", b"print('v1')\n")
    put(root, "/srv/app/run", b"#!/bin/sh\nexec python3 app.py\n", 0o755)
    put(root, "/srv/app/tool", b"MZ-not-a-script", 0o755)
    put(root, "/srv/app/empty-exec", b"", 0o755)
    put(root, "/srv/app/_speedups.cpython-311-x86_64-linux-gnu.so", b"not even elf")
    put(root, "/srv/app/script.py", b"print(1)\n", 0o755)  # executable, no #!, script extension
    put(root, "/usr/lib/libz.so.1", b"whatever")
    put(root, "/lib/modules/6.1/extra/foo.ko", b"module")
    put(root, "/bin/busybox", ELF, 0o755)
    os.symlink("busybox", root / "bin/sh")
    put(root, "/etc/hostname", b"sim\n")
    put(root, "/boot/zImage", b"kernel v1")
    write_marker(root, True)
    return root


def test_entries_describe_files_dirs_symlinks(tree: Path) -> None:
    m = build_manifest(tree, app_dirs=["/srv/app"])
    app = m.entries["/srv/app/app.py"]
    assert app == Entry(
        "/srv/app/app.py", "file", 0o644, 12, hashlib.sha256(b"print('v1')\n").hexdigest(), None, False
    )
    assert m.entries["/srv/app"].kind == "dir" and m.entries["/srv/app"].size == 0
    assert m.entries["/srv/app"].sha256 is None
    assert m.entries["/bin/sh"] == Entry("/bin/sh", "symlink", 0o777, 0, None, "busybox", False)
    assert m.entries["/bin/busybox"].mode == 0o755
    assert "/" not in m.entries
    assert list(m.entries) == sorted(m.entries)


def test_native_by_content_name_and_executable_bit(tree: Path) -> None:
    m = build_manifest(tree, app_dirs=["/srv/app"])
    native = {p for p, e in m.entries.items() if e.native}
    assert native == {
        "/bin/busybox",  # ELF magic
        "/srv/app/tool",  # executable, neither ELF nor a script
        "/srv/app/_speedups.cpython-311-x86_64-linux-gnu.so",  # name
        "/usr/lib/libz.so.1",  # name .so.N
        "/lib/modules/6.1/extra/foo.ko",  # name .ko
    }


@pytest.mark.parametrize(
    ("path", "mode", "head", "expected"),
    [
        ("/x/data.bin", 0o644, ELF, True),
        ("/x/app.py", 0o755, ELF, True),  # content wins over the extension
        ("/x/run", 0o755, b"#!/bin/sh", False),
        ("/x/run", 0o755, b"\x00\x01", True),
        ("/x/run", 0o755, None, True),  # content unknown: executable without script extension
        ("/x/run.sh", 0o755, None, False),
        ("/x/lib.so.1.2", 0o644, b"text", True),
        ("/x/mod.ko.xz", 0o644, None, True),
        ("/x/notes.sox", 0o644, b"text", False),
        ("/x/readme", 0o644, b"text", False),
    ],
)
def test_is_native(path: str, mode: int, head: bytes | None, expected: bool) -> None:
    assert is_native(path, mode, head) is expected


PY = ("/usr/bin/python3*", "/usr/lib/python3*")


@pytest.mark.parametrize(
    ("path", "mode", "head", "reason"),
    [
        ("/srv/app/data.bin", 0o644, ELF, "ELF executable or library"),
        ("/srv/app/lib.so", 0o644, b"text", "named like a shared object or kernel module"),
        ("/srv/app/run", 0o755, b"\x00\x01", "executable, not a script"),
        ("/srv/app/run.py", 0o755, b"print(1)", None),  # an executable .py without #!: python's own
        ("/srv/app/run", 0o755, b"#!/bin/sh\n", "#! runs /bin/sh, outside the app and not an interpreter"),
        ("/srv/app/run", 0o755, b"#!/usr/bin/../bin/perl\n", "#! runs /usr/bin/perl, outside the app"),
        ("/srv/app/run", 0o755, b"#!/usr/bin/python3.11 -u\n", None),
        ("/srv/app/run", 0o755, b"#! /usr/bin/python3\n", None),
        ("/srv/app/run", 0o755, b"#!/usr/bin/env python3\n", None),
        ("/srv/app/run", 0o755, b"#!/usr/bin/env -S python3 -u\n", None),
        ("/srv/app/run", 0o755, b"#!/usr/bin/env PYTHONOPTIMIZE=1 python3\n", None),
        ("/srv/app/run", 0o755, b"#!/usr/bin/env node\n", "#! runs 'node', which is not an interpreter"),
        ("/srv/app/run", 0o755, b"#!/usr/bin/env\n", "#! line names no program"),
        ("/srv/app/run", 0o755, b"#!\n", "#! line names no program"),
        ("/srv/app/run", 0o755, b"#!/srv/app/bin/runner\n", None),  # inside the app: judged on its own
        ("/srv/app/run", 0o644, b"#!/bin/sh\n", None),  # not executable
        ("/srv/app/empty", 0o755, b"", None),
    ],
)
def test_native_by_content(path: str, mode: int, head: bytes, reason: str | None) -> None:
    found = native_by_content(path, mode, head, app_dirs=("/srv/app",), interpreter=PY)
    if reason is None:
        assert found is None
    else:
        assert found is not None and found.startswith(reason), found


def test_manifest_bounds(tmp_path: Path) -> None:
    put(tmp_path / "root", "/srv/app/a.py", b"1")
    put(tmp_path / "root", "/srv/app/b.py", b"2")
    data = dump_manifest(build_manifest(tmp_path / "root"))
    assert len(load_manifest(data, max_entries=5).entries) == 4  # /srv, /srv/app and two files
    with pytest.raises(ManifestError, match=r"lists 4 paths, more than 3 \(\[inspect\] max_manifest_entries\)"):
        load_manifest(data, name="m", max_entries=3)
    with pytest.raises(ManifestError, match=r"larger than 100 bytes \(\[inspect\] max_manifest_size\)"):
        load_manifest(data, name="m", max_size=100)


def test_marker_and_manifest_are_excluded(tree: Path) -> None:
    write_manifest(tree, build_manifest(tree, app_dirs=["/srv/app"]))
    m = build_manifest(tree, app_dirs=["/srv/app"])
    assert (tree / "srv/app/HOT_RELOAD").exists() and (tree / "usr/share/sshfwup/manifest.json").exists()
    assert MARKER_PATH not in m.entries and MANIFEST_PATH not in m.entries
    assert m.excluded == tuple(sorted((MANIFEST_PATH, MARKER_PATH)))


def test_custom_exclude_covers_a_subtree(tree: Path) -> None:
    m = build_manifest(tree, app_dirs=["/srv/app"], exclude=["/etc"])
    assert not any(p == "/etc" or p.startswith("/etc/") for p in m.entries)
    assert MARKER_PATH in m.entries  # the defaults were replaced, not added to


def test_symlinks_are_not_followed(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    put(outside, "/secret.txt", b"host file")
    os.symlink(outside, tree / "srv/app/linked")
    m = build_manifest(tree, app_dirs=["/srv/app"])
    assert m.entries["/srv/app/linked"].kind == "symlink"
    assert not any("secret" in p for p in m.entries)


def test_same_tree_same_bytes(tree: Path, tmp_path: Path) -> None:
    first = dump_manifest(build_manifest(tree, app_dirs=["/srv/app"], kernel="/boot/zImage"))
    # a second copy made in a different order, different mtimes: same manifest
    copy = tmp_path / "copy"
    for host in sorted(tree.rglob("*"), reverse=True):
        rel = "/" + host.relative_to(tree).as_posix()
        if host.is_symlink():
            (copy / rel.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(host), copy / rel.lstrip("/"))
        elif host.is_file():
            put(copy, rel, host.read_bytes(), host.stat().st_mode & 0o7777)
    for host in tree.rglob("*"):
        if host.is_dir() and not host.is_symlink():
            os.chmod(copy / host.relative_to(tree), host.stat().st_mode & 0o7777)
    os.utime(copy / "srv/app/app.py", (1, 1))
    second = dump_manifest(build_manifest(copy, app_dirs=["/srv/app"], kernel="/boot/zImage"))
    assert first == second
    assert first.endswith(b"}\n")
    doc = json.loads(first)
    assert doc["format"] == FORMAT
    assert list(doc) == sorted(doc)
    # sorted, with the app's entries last: an app change then changes only the manifest's end
    # (in the squashfs: its last block), which keeps delta patches small
    outside = [p for p in doc["entries"] if not p.startswith("/srv/app")]
    assert list(doc["entries"]) == sorted(outside) + sorted(set(doc["entries"]) - set(outside))
    assert outside and len(outside) < len(doc["entries"])


def test_content_change_changes_the_bytes(tree: Path) -> None:
    before = dump_manifest(build_manifest(tree, app_dirs=["/srv/app"]))
    put(tree, "/srv/app/app.py", b"print('v2')\n")
    assert dump_manifest(build_manifest(tree, app_dirs=["/srv/app"])) != before


def test_write_and_load_round_trip(tree: Path) -> None:
    m = build_manifest(tree, app_dirs=["/srv/app"], kernel="/boot/zImage")
    written = write_manifest(tree, m)
    assert written == tree / "usr/share/sshfwup/manifest.json"
    assert written.stat().st_mode & 0o7777 == 0o644
    assert written.read_bytes() == dump_manifest(m)
    assert [p.name for p in written.parent.iterdir()] == ["manifest.json"]  # no temp file left
    assert load_manifest(written) == m
    assert load_manifest(written.read_bytes()) == m
    assert load_manifest(written.read_text()) == m


def test_kernel_and_dtbs_inside_the_rootfs(tree: Path) -> None:
    put(tree, "/boot/sim.dtb", b"dtb")
    m = build_manifest(tree, app_dirs=["/srv/app"], kernel="/boot/zImage", dtbs=[tree / "boot/sim.dtb"])
    assert m.kernel == "/boot/zImage"
    assert m.dtbs == ("/boot/sim.dtb",)  # a host Path inside the root maps to its rootfs path
    assert not any(p.startswith("@") for p in m.entries)


def test_kernel_and_dtbs_outside_the_rootfs_are_virtual_entries(tree: Path, tmp_path: Path) -> None:
    kernel = put(tmp_path / "boot", "/zImage", b"external kernel", 0o600)
    dtb = put(tmp_path / "boot", "/sim.dtb", b"external dtb")
    m = build_manifest(tree, app_dirs=["/srv/app"], kernel=kernel, dtbs=[dtb])
    assert m.kernel == "@kernel" and m.dtbs == ("@dtb/sim.dtb",)
    assert m.entries["@kernel"].sha256 == hashlib.sha256(b"external kernel").hexdigest()
    assert m.entries["@kernel"].size == len(b"external kernel")
    assert m.entries["@kernel"].mode == 0o644  # host mode is meaningless for a boot partition
    assert load_manifest(dump_manifest(m)) == m


def test_boot_file_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="kernel /boot/Image is not in the root filesystem"):
        build_manifest(tree, app_dirs=["/srv/app"], kernel="/boot/Image")
    with pytest.raises(ManifestError, match="absolute"):
        build_manifest(tree, app_dirs=["/srv/app"], kernel="boot/zImage")
    a = put(tmp_path / "a", "/x.dtb", b"1")
    b = put(tmp_path / "b", "/x.dtb", b"2")
    with pytest.raises(ManifestError, match="@dtb/x.dtb is given twice"):
        build_manifest(tree, app_dirs=["/srv/app"], dtbs=[a, b])
    with pytest.raises(ManifestError, match="cannot read kernel"):
        build_manifest(tree, app_dirs=["/srv/app"], kernel=tmp_path / "missing")


def test_relative_app_dir_is_refused(tree: Path) -> None:
    with pytest.raises(ManifestError, match="app directory must be an absolute path"):
        build_manifest(tree, app_dirs=["srv/app"])


def _valid_doc() -> dict:
    return {
        "format": FORMAT,
        "app_dirs": ["/srv/app"],
        "entries": {
            "/srv/app": {"kind": "dir", "mode": "0755"},
            "/srv/app/app.py": {"kind": "file", "mode": "0644", "size": 1, "sha256": "a" * 64, "native": False},
        },
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n", r"manifest <data> is not an sshfwup manifest \(not UTF-8 text\)"),
        (b"{not json", r"manifest <data> is not an sshfwup manifest \(not JSON: .* line 1 column 2\)"),
        (b"[1, 2]", r"is not an sshfwup manifest \(expected a JSON object\)"),
        (b'{"name": "package.json"}', r'is not an sshfwup manifest \(no "format": "sshfwup-manifest/1"\)'),
        (b'{"format": "other/1"}', "is not an sshfwup manifest"),
        (b'{"format": "sshfwup-manifest/2"}', r"unsupported manifest format 'sshfwup-manifest/2' in <data> \(this sshfwup reads sshfwup-manifest/1\)"),
    ],
)
def test_load_refuses_alien_data(data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_manifest(data)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (lambda d: d["entries"]["/srv/app/app.py"].update(sha256="xyz"), r"entry '/srv/app/app.py': a file needs sha256"),
        (lambda d: d["entries"]["/srv/app/app.py"].update(mode=420), r"mode must be an octal string"),
        (lambda d: d["entries"]["/srv/app/app.py"].update(kind="fifo"), r"kind must be one of"),
        (lambda d: d["entries"]["/srv/app/app.py"].update(size=-1), r"size must be a non-negative integer"),
        (lambda d: d["entries"].update({"srv/x": {"kind": "dir", "mode": "0755"}}), r"entry 'srv/x': path must be absolute"),
        (lambda d: d["entries"].update({"/srv/../x": {"kind": "dir", "mode": "0755"}}), r"path is not normalized"),
        (lambda d: d["entries"].update({"/l": {"kind": "symlink", "mode": "0777"}}), r"entry '/l': a symlink needs a target"),
        (lambda d: d.update(kernel="/boot/zImage"), r"/boot/zImage is named as kernel/device tree but has no entry"),
        (lambda d: d.update(entries=[]), r"'entries' must be an object"),
        (lambda d: d.update(app_dirs="/srv/app"), r"'app_dirs' must be a list of strings"),
    ],
)
def test_load_names_the_broken_field(patch, message: str) -> None:
    doc = _valid_doc()
    load_manifest(json.dumps(doc))  # the unpatched document is fine
    patch(doc)
    with pytest.raises(ManifestError, match=r"manifest /usr/share/sshfwup/manifest.json is invalid: .*" + message):
        load_manifest(json.dumps(doc), name="/usr/share/sshfwup/manifest.json")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"manifest .*nope.json not found"):
        load_manifest(tmp_path / "nope.json")


def test_native_is_derived_when_another_tool_left_it_out() -> None:
    doc = _valid_doc()
    doc["entries"]["/srv/app/helper"] = {"kind": "file", "mode": "0755", "size": 1, "sha256": "b" * 64}
    doc["entries"]["/srv/app/run.sh"] = {"kind": "file", "mode": "0755", "size": 1, "sha256": "c" * 64}
    del doc["entries"]["/srv/app/app.py"]["native"]
    m = load_manifest(json.dumps(doc))
    assert m.entries["/srv/app/helper"].native is True
    assert m.entries["/srv/app/run.sh"].native is False
    assert m.entries["/srv/app/app.py"].native is False


@pytest.mark.parametrize(("data", "expected"), [(b"true", True), (b" TRUE\n", True), (b"False\r\n", False), (None, None)])
def test_read_marker(data: bytes | None, expected: bool | None) -> None:
    assert read_marker(data) is expected


def test_read_marker_from_files(tmp_path: Path) -> None:
    assert read_marker(write_marker(tmp_path, True)) is True
    assert read_marker(write_marker(tmp_path, False)) is False
    assert (tmp_path / "srv/app/HOT_RELOAD").read_bytes() == b"false\n"
    assert read_marker(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("data", "shown"),
    [(b"yes", "'yes'"), (b"", "''"), (b"true false\n", "'true false'"), (b"1", "'1'"), (b"x" * 10000, "'" + "x" * 40 + "'…")],
)
def test_read_marker_names_bad_content(data: bytes, shown: str) -> None:
    with pytest.raises(ManifestError) as info:
        read_marker(data, name="/srv/app/HOT_RELOAD")
    assert str(info.value) == f"HOT_RELOAD marker /srv/app/HOT_RELOAD must say true or false, not {shown}"


@pytest.mark.parametrize(
    ("path", "dirs", "expected"),
    [
        ("/srv/app", ["/srv/app"], True),
        ("/srv/app/x.py", ["/srv/app"], True),
        ("/srv/app/x.py", ["/srv/app/"], True),
        ("/srv/application", ["/srv/app"], False),
        ("/srv/application/x.py", ["/srv/app"], False),
        ("/srv/ap", ["/srv/app"], False),
        ("/srv", ["/srv/app"], False),
        ("/etc/x", ["/srv/app", "/etc"], True),
        ("/anything", ["/"], True),
        ("@kernel", ["/"], False),
        ("/srv/app/../etc/passwd", ["/srv/app"], False),
    ],
)
def test_inside(path: str, dirs: list[str], expected: bool) -> None:
    assert inside(path, dirs) is expected


def test_resolve_in_root_keeps_absolute_symlinks_inside(tmp_path: Path) -> None:
    root = tmp_path / "slot"
    put(root, "/real/share/sshfwup/manifest.json", b"{}")
    (root / "usr").mkdir()
    os.symlink("/real/share", root / "usr/share")  # absolute: must mean <root>/real/share
    assert resolve_in_root(root, MANIFEST_PATH) == root / "real/share/sshfwup/manifest.json"
    assert read_rootfs_file(root, MANIFEST_PATH, limit=100, what="manifest") == b"{}"
    os.symlink("../../..", root / "real/up")
    assert resolve_in_root(root, "/real/up/real/share") == root / "real/share"  # ".." stops at root
    os.symlink("loop", root / "loop")
    with pytest.raises(ManifestError, match="too many levels of symbolic links"):
        resolve_in_root(root, "/loop/x")


def test_read_rootfs_file_problems(tmp_path: Path) -> None:
    put(tmp_path, "/big", b"x" * 101)
    (tmp_path / "dir").mkdir()
    assert read_rootfs_file(tmp_path, "/missing/file", limit=100, what="manifest") is None
    with pytest.raises(ManifestError, match="manifest /big is larger than 100 bytes"):
        read_rootfs_file(tmp_path, "/big", limit=100, what="manifest")
    with pytest.raises(ManifestError, match="manifest /dir is a directory"):
        read_rootfs_file(tmp_path, "/dir", limit=100, what="manifest")


def test_manifest_dataclass_defaults() -> None:
    m = Manifest({})
    assert m.app_dirs == ("/srv/app",) and m.kernel is None and m.dtbs == ()
    assert load_manifest(dump_manifest(m)) == m


def test_a_fifo_in_place_of_the_manifest_does_not_hang(tmp_path: Path) -> None:
    from sshfwup.firmware.manifest import MANIFEST_PATH, ManifestError, read_rootfs_file

    target = tmp_path / MANIFEST_PATH.lstrip("/")
    target.parent.mkdir(parents=True)
    os.mkfifo(target)
    with pytest.raises(ManifestError, match="is not a regular file"):
        read_rootfs_file(tmp_path, MANIFEST_PATH, limit=1 << 20, what="manifest")
