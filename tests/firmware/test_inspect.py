"""sshfwup.firmware.inspect: the hot-or-reboot verdict, on the device (inspect_slot) and the host (decide)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sshfwup.firmware.inspect import (
    DEFAULT_INTERPRETER,
    Change,
    Verdict,
    decide,
    Policy,
    check_app_files,
    diff_manifests,
    inspect_slot,
    read_slot,
    resource_reasons,
    verify_app_files,
)
from sshfwup.firmware.manifest import (
    MANIFEST_PATH,
    MARKER_PATH,
    Entry,
    Manifest,
    ManifestError,
    build_manifest,
    load_manifest,
    read_marker,
    write_manifest,
    write_marker,
)

APP = ("/srv/app",)
ELF = b"\x7fELF\x02\x01\x01" + bytes(64)

Edit = Callable[[Path], None]


def put(root: Path, path: str, data: bytes = b"", mode: int = 0o644) -> None:
    host = root / path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(data)
    os.chmod(host, mode)


def link(root: Path, path: str, target: str) -> None:
    host = root / path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    if host.is_symlink():
        host.unlink()
    os.symlink(target, host)


def populate(root: Path) -> None:
    """A small but complete root filesystem, the same every time."""
    put(root, "/bin/busybox", ELF + b"busybox", 0o755)
    link(root, "/bin/sh", "busybox")
    put(root, "/boot/zImage", b"kernel 6.1.0")
    put(root, "/boot/sim.dtb", b"device tree 1")
    put(root, "/etc/hostname", b"sim\n")
    put(root, "/etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    put(root, "/etc/group", b"root:x:0:\n")
    put(root, "/lib/modules/6.1.0/extra/foo.ko", b"module 1")
    put(root, "/usr/bin/python3.11", ELF + b"python", 0o755)
    link(root, "/usr/bin/python3", "python3.11")
    put(root, "/usr/lib/python3.11/os.py", b"# os\n")
    put(root, "/usr/lib/python3.11/json/__init__.py", b"# json\n")
    put(root, "/srv/app/app.py", b"print('hello v1')\n")
    put(root, "/srv/app/lib/util.py", b"def f(): return 1\n")
    put(root, "/srv/app/run", b"#!/bin/sh\nexec python3 /srv/app/app.py\n", 0o755)
    put(root, "/srv/app/_old.so", ELF + b"old")
    link(root, "/srv/app/current", "lib")
    put(root, "/srv/application/other.txt", b"not the app\n")


def firmware(
    tmp_path: Path,
    name: str,
    edit: Edit | None = None,
    *,
    marker: bool | None = True,
    manifest: bool = True,
    kernel: str | Path | None = "/boot/zImage",
    dtbs: tuple[str | Path, ...] = ("/boot/sim.dtb",),
) -> Path:
    """A root filesystem as the firmware build leaves it: tree, marker, manifest."""
    root = tmp_path / name
    populate(root)
    if edit is not None:
        edit(root)
    if marker is not None:
        write_marker(root, marker)
    if manifest:
        write_manifest(root, build_manifest(root, app_dirs=APP, kernel=kernel, dtbs=dtbs))
    return root


def device_verdict(old: Path, new: Path, app_dirs: tuple[str, ...] = APP) -> Verdict:
    return inspect_slot(
        old, new, manifest_path=MANIFEST_PATH, marker_path=MARKER_PATH, app_dirs=app_dirs,
        interpreter=DEFAULT_INTERPRETER,
    )


def host_verdict(old: Path, new: Path, app_dirs: tuple[str, ...] = APP) -> Verdict:
    """What `sshfwup firmware diff` does: the files' bytes (as read out of a .fw) → decide."""

    def manifest_of(root: Path) -> Manifest | ManifestError | None:
        f = root / MANIFEST_PATH.lstrip("/")
        if not f.exists():
            return None
        try:
            return load_manifest(f.read_bytes(), name=MANIFEST_PATH)
        except ManifestError as e:
            return e

    marker_file = new / MARKER_PATH.lstrip("/")
    try:
        marker: bool | ManifestError | None = read_marker(
            marker_file.read_bytes() if marker_file.exists() else None, name=MARKER_PATH
        )
    except ManifestError as e:
        marker = e
    running, candidate = manifest_of(old), manifest_of(new)
    policy = Policy(app_dirs)
    app = None  # firmware diff checks the app directories it extracts from the .fw, like this
    if isinstance(candidate, Manifest):
        app = check_app_files(new, candidate, policy, exclude=policy.excluded(running))
    return decide(
        running, candidate, marker, app_dirs=app_dirs, interpreter=DEFAULT_INTERPRETER, app=app,
        exclude=policy.excluded(None),
    )  # fmt: skip


def judge(old: Path, new: Path, app_dirs: tuple[str, ...] = APP) -> Verdict:
    """The device's verdict, checked against the host's: both must reach the same one."""
    verdict = device_verdict(old, new, app_dirs)
    assert host_verdict(old, new, app_dirs) == verdict
    return verdict


@pytest.fixture
def running(tmp_path: Path) -> Path:
    return firmware(tmp_path, "running")


# --- hot -----------------------------------------------------------------------------------


def test_identical_firmware_with_marker_true_is_hot(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new"))
    assert v == Verdict(hot=True, reasons=(), changes=())
    assert v.summary() == "hot reload"


def test_app_file_changed_is_hot_and_listed(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new", lambda r: put(r, "/srv/app/app.py", b"print('v2')\n")))
    assert v.hot and v.reasons == ()
    assert v.changes == (Change("/srv/app/app.py", "changed", True, False, "content"),)


def test_app_files_added_and_removed_are_hot(tmp_path: Path, running: Path) -> None:
    def edit(r: Path) -> None:
        (r / "srv/app/lib/util.py").unlink()
        put(r, "/srv/app/lib/new.py", b"x = 2\n")
        put(r, "/srv/app/tool.py", b"#!/usr/bin/python3 -u\nprint(1)\n", 0o755)  # the interpreter's script
        put(r, "/srv/app/env.py", b"#!/usr/bin/env -S python3.11 -u\nprint(1)\n", 0o755)
        put(r, "/srv/app/own.sh", b"#!/srv/app/bin/runner\n", 0o755)  # an interpreter in the app
        (r / "srv/app/_old.so").unlink()  # removing native code does not run any

    v = judge(running, firmware(tmp_path, "new", edit))
    assert v.hot, v.summary()
    assert v.changes == (
        Change("/srv/app/_old.so", "removed", True, True, "file"),
        Change("/srv/app/env.py", "added", True, False, "file"),
        Change("/srv/app/lib/new.py", "added", True, False, "file"),
        Change("/srv/app/lib/util.py", "removed", True, False, "file"),
        Change("/srv/app/own.sh", "added", True, False, "file"),
        Change("/srv/app/tool.py", "added", True, False, "file"),
    )


def test_symlink_and_mode_changes_in_the_app_are_hot(tmp_path: Path, running: Path) -> None:
    def edit(r: Path) -> None:
        link(r, "/srv/app/current", "lib2")
        os.chmod(r / "srv/app/lib/util.py", 0o600)
        shutil.rmtree(r / "srv/app/lib")
        put(r, "/srv/app/lib", b"now a file\n")

    v = judge(running, firmware(tmp_path, "new", edit))
    assert v.hot, v.summary()
    assert v.changes == (
        Change("/srv/app/current", "changed", True, False, "symlink target"),
        Change("/srv/app/lib", "changed", True, False, "kind"),
        Change("/srv/app/lib/util.py", "removed", True, False, "file"),
    )
    v = judge(running, firmware(tmp_path, "new2", lambda r: os.chmod(r / "srv/app/app.py", 0o600)))
    assert v.hot and v.changes == (Change("/srv/app/app.py", "changed", True, False, "mode"),)


def test_outside_files_are_trusted_on_the_device(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new")
    put(new, "/etc/hostname", b"changed after the build\n")  # fwup verified the image; not our job
    assert device_verdict(running, new).hot


def test_config_app_dirs_win_over_the_manifest(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new", lambda r: put(r, "/srv/application/other.txt", b"v2\n"))
    assert not judge(running, new).hot
    v = judge(running, new, app_dirs=("/srv/app", "/srv/application"))
    assert v.hot and v.changes == (Change("/srv/application/other.txt", "changed", True, False, "content"),)


# --- each reboot reason alone ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda r: put(r, "/boot/zImage", b"kernel 6.1.1"), "kernel changed"),
        (lambda r: put(r, "/boot/sim.dtb", b"device tree 2"), "device tree changed (sim.dtb)"),
        (lambda r: put(r, "/usr/bin/python3.11", ELF + b"python 2", 0o755), "interpreter changed (/usr/bin/python3.11)"),
        (lambda r: link(r, "/usr/bin/python3", "python3.12"), "interpreter changed (/usr/bin/python3)"),
        (
            lambda r: (put(r, "/usr/lib/python3.11/os.py", b"# 2"), put(r, "/usr/lib/python3.11/new.py")),
            "interpreter changed (/usr/lib/python3.11 (2 files))",
        ),
        (lambda r: put(r, "/srv/app/_speedups.so", b"anything"), "native code in the app changed (/srv/app/_speedups.so)"),
        (lambda r: put(r, "/srv/app/_old.so", ELF + b"new"), "native code in the app changed (/srv/app/_old.so)"),
        (lambda r: put(r, "/srv/app/helper", ELF + b"x", 0o755), "native code in the app changed (/srv/app/helper)"),
        (lambda r: put(r, "/srv/app/lib/data.py", ELF), "native code in the app changed (/srv/app/lib/data.py)"),
        (lambda r: put(r, "/srv/app/blob", b"\x00\x01", 0o755), "native code in the app changed (/srv/app/blob)"),
        (lambda r: os.chmod(r / "srv/app/_old.so", 0o755), "native code in the app changed (/srv/app/_old.so)"),
        (lambda r: put(r, "/etc/hostname", b"other\n"), "/etc changed (/etc/hostname)"),
        (
            lambda r: [put(r, f"/etc/{n}", b"new\n") for n in ("hostname", "passwd", "fstab")],
            "/etc changed (3 files)",
        ),
        (lambda r: put(r, "/lib/modules/6.1.0/extra/foo.ko", b"module 2"), "/lib/modules changed (/lib/modules/6.1.0/extra/foo.ko)"),
        (lambda r: put(r, "/srv/application/other.txt", b"v2\n"), "/srv changed (/srv/application/other.txt)"),
        (lambda r: link(r, "/bin/sh", "bash"), "/bin changed (/bin/sh)"),
        (lambda r: os.chmod(r / "etc/passwd", 0o600), "/etc changed (/etc/passwd)"),
        (lambda r: put(r, "/init", b"#!/bin/sh\n", 0o755), "/init changed"),
        (lambda r: put(r, "/boot/overlays/extra.dtbo", b"overlay"), "device tree changed (extra.dtbo)"),
    ],
)
def test_single_reboot_reason(tmp_path: Path, running: Path, edit: Edit, reason: str) -> None:
    v = judge(running, firmware(tmp_path, "new", edit))
    assert not v.hot
    assert v.reasons == (reason,)
    assert v.summary() == f"reboot required: {reason}"
    assert v.changes, "the changes behind the reason are listed"


def test_marker_false(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new", marker=False))
    assert v.reasons == ("HOT_RELOAD marker says false",) and not v.hot


def test_marker_missing(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new", marker=None))
    assert v.summary() == "reboot required: HOT_RELOAD marker missing"


def test_marker_garbage(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new", lambda r: put(r, MARKER_PATH, b"yes please\n"), marker=None)
    v = judge(running, new)
    assert v.reasons == ("HOT_RELOAD marker /srv/app/HOT_RELOAD must say true or false, not 'yes please'",)


def test_marker_is_a_directory(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new", lambda r: (r / MARKER_PATH.lstrip("/")).mkdir(), marker=None)
    assert device_verdict(running, new).reasons == ("HOT_RELOAD marker /srv/app/HOT_RELOAD is a directory, not a file",)


def test_manifest_missing_in_the_new_firmware(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new", manifest=False))
    assert v.reasons == ("manifest missing in the new firmware",) and v.changes == ()


def test_manifest_missing_in_the_running_firmware(tmp_path: Path) -> None:
    v = judge(firmware(tmp_path, "old", manifest=False), firmware(tmp_path, "new"))
    assert v.reasons == ("manifest missing in the running firmware",) and not v.hot


def test_corrupt_manifest(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new")
    (new / MANIFEST_PATH.lstrip("/")).write_bytes(b'{"format": "sshfwup-manifest/1", "entries": {')
    v = judge(running, new)
    assert not v.hot
    assert v.reasons == (
        "manifest unusable in the new firmware: manifest /usr/share/sshfwup/manifest.json is not an "
        "sshfwup manifest (not JSON: Expecting property name enclosed in double quotes at line 1 column 46)",
    )


def test_alien_manifest_in_the_running_firmware(tmp_path: Path) -> None:
    old = firmware(tmp_path, "old")
    (old / MANIFEST_PATH.lstrip("/")).write_text('{"format": "sshfwup-manifest/9"}')
    v = judge(old, firmware(tmp_path, "new"))
    assert v.reasons == (
        "manifest unusable in the running firmware: unsupported manifest format 'sshfwup-manifest/9' "
        "in /usr/share/sshfwup/manifest.json (this sshfwup reads sshfwup-manifest/1)",
    )


def test_kernel_outside_the_rootfs(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    put(boot, "/v1/zImage", b"kernel one")
    put(boot, "/v2/zImage", b"kernel one")
    put(boot, "/v3/zImage", b"kernel two")
    old = firmware(tmp_path, "old", kernel=boot / "v1/zImage")
    assert judge(old, firmware(tmp_path, "same", kernel=boot / "v2/zImage")).hot
    v = judge(old, firmware(tmp_path, "new", kernel=boot / "v3/zImage"))
    assert v.reasons == ("kernel changed",)
    assert v.changes == (Change("@kernel", "changed", False, False, "content"),)


def test_kernel_recorded_on_one_side_only(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new", kernel=None))
    assert v.reasons == ("kernel changed (not recorded in the new firmware)",)
    v = judge(firmware(tmp_path, "old", dtbs=()), firmware(tmp_path, "new2"))
    assert v.reasons == ("device tree changed (not recorded in the running firmware)",)


def test_neither_side_knows_the_kernel(tmp_path: Path) -> None:
    old = firmware(tmp_path, "old", kernel=None, dtbs=())
    v = judge(old, firmware(tmp_path, "new", lambda r: put(r, "/boot/zImage", b"k2"), kernel=None, dtbs=()))
    assert v.reasons == ("/boot changed (/boot/zImage)",)  # still a reboot, just less specific


# --- the new slot's app files against its manifest ------------------------------------------


@pytest.mark.parametrize(
    ("tamper", "path"),
    [
        (lambda r: put(r, "/srv/app/app.py", b"print('evil')\n"), "/srv/app/app.py"),
        (lambda r: put(r, "/srv/app/extra.py", b"x = 1\n"), "/srv/app/extra.py"),
        (lambda r: (r / "srv/app/lib/util.py").unlink(), "/srv/app/lib/util.py"),
        (lambda r: os.chmod(r / "srv/app/app.py", 0o755), "/srv/app/app.py"),
        (lambda r: link(r, "/srv/app/current", "/etc"), "/srv/app/current"),
    ],
)
def test_app_files_must_match_the_new_manifest(tmp_path: Path, running: Path, tamper: Edit, path: str) -> None:
    new = firmware(tmp_path, "new")
    tamper(new)  # after the manifest was written
    v = device_verdict(running, new)
    assert v.reasons == (f"app files do not match the manifest ({path})",)
    assert host_verdict(running, new) == v  # firmware diff extracts and checks the app dirs too


def test_app_dir_replaced_by_a_symlink_is_a_mismatch(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new")
    shutil.rmtree(new / "srv/app")
    link(new, "/srv/app", "/srv/application")
    v = device_verdict(running, new)
    assert v.reasons == (
        "HOT_RELOAD marker missing",  # /srv/app/HOT_RELOAD now resolves into /srv/application
        "app files do not match the manifest (/srv/app, /srv/app/_old.so, /srv/app/app.py and 4 more)",
    )


def test_verify_app_files_ignores_marker_and_outside(tmp_path: Path) -> None:
    root = firmware(tmp_path, "new")
    manifest = load_manifest(root / MANIFEST_PATH.lstrip("/"))
    write_marker(root, False)  # the marker is excluded from the manifest
    put(root, "/etc/hostname", b"changed\n")
    assert verify_app_files(root, manifest, app_dirs=APP) == ()
    put(root, "/srv/app/app.py", b"changed\n")
    assert verify_app_files(root, manifest, app_dirs=APP) == ("/srv/app/app.py",)


# --- several reasons, order, the pure function -------------------------------------------------


def test_every_reason_is_listed_most_serious_first(tmp_path: Path, running: Path) -> None:
    def edit(r: Path) -> None:
        put(r, "/etc/hostname", b"x\n")
        put(r, "/var/lib/state", b"x\n")
        put(r, "/srv/app/_speedups.so", b"x")
        put(r, "/usr/bin/python3.11", ELF + b"3.11.9", 0o755)
        put(r, "/lib/modules/6.1.0/extra/foo.ko", b"module 2")
        put(r, "/boot/sim.dtb", b"device tree 2")
        put(r, "/boot/zImage", b"kernel 6.1.1")
        put(r, "/srv/app/app.py", b"print('v2')\n")

    new = firmware(tmp_path, "new", edit, marker=False)
    put(new, "/srv/app/lib/util.py", b"tampered\n")
    v = device_verdict(running, new)
    assert v.reasons == (
        "HOT_RELOAD marker says false",
        "app files do not match the manifest (/srv/app/lib/util.py)",
        "kernel changed",
        "device tree changed (sim.dtb)",
        "/lib/modules changed (/lib/modules/6.1.0/extra/foo.ko)",
        "interpreter changed (/usr/bin/python3.11)",
        "native code in the app changed (/srv/app/_speedups.so)",
        "/etc changed (/etc/hostname)",
        "/var changed (/var/lib/state)",
    )
    assert v.summary().startswith("reboot required: HOT_RELOAD marker says false, app files do not match")
    assert [c.path for c in v.changes] == sorted(c.path for c in v.changes)
    assert device_verdict(running, new) == v  # deterministic


def test_both_manifests_missing_and_marker_missing(tmp_path: Path) -> None:
    v = judge(firmware(tmp_path, "old", manifest=False), firmware(tmp_path, "new", manifest=False, marker=None))
    assert v.reasons == (
        "manifest missing in the new firmware",
        "manifest missing in the running firmware",
        "HOT_RELOAD marker missing",
    )


def test_long_lists_are_shortened() -> None:
    old = Manifest({}, kernel=None)
    entries = {f"/srv/app/m{i}.so": Entry(f"/srv/app/m{i}.so", "file", 0o644, 1, "a" * 64, None, True) for i in range(5)}
    v = decide(old, Manifest(entries), True, app_dirs=APP)
    assert v.reasons == (
        "native code in the app changed (/srv/app/m0.so, /srv/app/m1.so, /srv/app/m2.so and 2 more)",
    )


def test_decide_without_manifests_still_reports_the_marker() -> None:
    v = decide(None, ManifestError("manifest x is not an sshfwup manifest (expected a JSON object)"), False, app_dirs=APP)
    assert v.reasons == (
        "manifest unusable in the new firmware: manifest x is not an sshfwup manifest (expected a JSON object)",
        "manifest missing in the running firmware",
        "HOT_RELOAD marker says false",
    )


def test_decide_refuses_programming_errors() -> None:
    m = Manifest({})
    with pytest.raises(ValueError, match="app_dirs must be absolute"):
        decide(m, m, True, app_dirs=["srv/app"])
    with pytest.raises(TypeError, match="expected the marker"):
        decide(m, m, "true", app_dirs=APP)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a Manifest"):
        decide({}, m, True, app_dirs=APP)  # type: ignore[arg-type]


def test_diff_skips_excluded_paths_and_uses_the_new_app_dirs() -> None:
    marker_true = Entry(MARKER_PATH, "file", 0o644, 5, "1" * 64)
    marker_false = Entry(MARKER_PATH, "file", 0o644, 6, "2" * 64)
    a = Entry("/opt/x.py", "file", 0o644, 1, "3" * 64)
    b = Entry("/opt/x.py", "file", 0o644, 1, "4" * 64)
    old = Manifest({MARKER_PATH: marker_true, a.path: a}, app_dirs=("/opt",))
    new = Manifest({MARKER_PATH: marker_false, b.path: b}, app_dirs=("/opt",))
    assert diff_manifests(old, new) == (Change("/opt/x.py", "changed", True, False, "content"),)
    assert diff_manifests(old, new, app_dirs=APP) == (Change("/opt/x.py", "changed", False, False, "content"),)
    unexcluded = Manifest(new.entries, app_dirs=("/opt",), excluded=())
    assert [c.path for c in diff_manifests(Manifest(old.entries, excluded=()), unexcluded)] == ["/opt/x.py", MARKER_PATH]


def test_verdict_json(tmp_path: Path, running: Path) -> None:
    v = judge(running, firmware(tmp_path, "new", lambda r: put(r, "/etc/hostname", b"x\n")))
    doc = json.loads(json.dumps(v.to_json()))
    assert doc == {
        "hot": False,
        "summary": "reboot required: /etc changed (/etc/hostname)",
        "reasons": ["/etc changed (/etc/hostname)"],
        "changes": [{"path": "/etc/hostname", "kind": "changed", "in_app": False, "native": False, "what": "content"}],
        "old_version": None,
        "new_version": None,
    }


def test_read_slot_follows_absolute_symlinks_inside_the_slot(tmp_path: Path) -> None:
    new = firmware(tmp_path, "new")
    real = new / "data/manifest.json"
    real.parent.mkdir()
    (new / MANIFEST_PATH.lstrip("/")).rename(real)
    shutil.rmtree(new / "usr/share")
    link(new, "/usr/share", "/data/share-does-not-exist")
    assert read_slot(new)[0] is None  # not the host's /usr/share
    (new / "usr/share").unlink()
    (new / "usr/share/sshfwup").mkdir(parents=True)
    link(new, MANIFEST_PATH, "/data/manifest.json")
    manifest, marker = read_slot(new)
    assert isinstance(manifest, Manifest) and marker is True


# --- the device decides what is inspected -------------------------------------------------------


def _patch_manifest(root: Path, change: Callable[[dict], None]) -> None:
    """Rewrite the finished manifest the way a hostile or careless build could."""
    f = root / MANIFEST_PATH.lstrip("/")
    doc = json.loads(f.read_text())
    change(doc)
    f.write_text(json.dumps(doc))


def test_the_new_manifest_cannot_exclude_what_it_changed(tmp_path: Path, running: Path) -> None:
    def edit(r: Path) -> None:
        put(r, "/boot/zImage", b"kernel 6.6.0")
        put(r, "/etc/hostname", b"other\n")

    new = firmware(tmp_path, "new", edit)
    _patch_manifest(new, lambda doc: doc["excluded"].extend(["/etc", "/boot"]))
    v = judge(running, new)
    assert not v.hot
    assert v.reasons == ("kernel changed", "/etc changed (/etc/hostname)")


def test_the_new_manifest_cannot_choose_the_app_dirs(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new", lambda r: put(r, "/etc/hostname", b"other\n"))
    _patch_manifest(new, lambda doc: doc.update(app_dirs=["/"]))
    assert judge(running, new).reasons == ("/etc changed (/etc/hostname)",)


def test_exclusions_of_the_policy_and_of_the_running_manifest_hold(tmp_path: Path) -> None:
    old = firmware(tmp_path, "old", lambda r: put(r, "/var/cache/x", b"0"))
    _patch_manifest(old, lambda doc: doc["excluded"].append("/var/cache"))
    new = firmware(tmp_path, "new", lambda r: (put(r, "/var/cache/x", b"1"), put(r, "/etc/hostname", b"x\n")))
    assert device_verdict(old, new).reasons == ("/etc changed (/etc/hostname)",)
    policy = Policy(APP, exclude=("/etc/hostname",))
    assert inspect_slot(old, new, policy).hot


def test_native_code_is_recognised_by_content_whatever_the_manifest_says(tmp_path: Path, running: Path) -> None:
    def edit(r: Path) -> None:
        put(r, "/srv/app/helper", ELF + b"payload")  # not executable, no .so name: still ELF

    new = firmware(tmp_path, "new", edit)
    _patch_manifest(new, lambda doc: doc["entries"]["/srv/app/helper"].update(native=False))
    v = judge(running, new)
    assert v.reasons == ("native code in the app changed (/srv/app/helper)",)
    assert v.changes == (Change("/srv/app/helper", "added", True, True, "file"),)


@pytest.mark.parametrize(
    ("script", "mode", "hot"),
    [
        (b"#!/bin/sh\necho hi\n", 0o755, False),  # runs a program outside the app
        (b"#!/usr/bin/perl -w\n", 0o755, False),
        (b"#!/usr/bin/env node\n", 0o755, False),
        (b"#!\n", 0o755, False),
        (b"#!/bin/sh\necho hi\n", 0o644, True),  # not executable: the kernel never runs its #!
        (b"#!/usr/bin/python3\n", 0o755, True),
        (b"#!/usr/bin/env python3\n", 0o755, True),
        (b"#!/srv/app/venv/bin/python\n", 0o755, True),  # the app's own interpreter (judged itself)
    ],
)
def test_scripts_count_as_native_when_their_interpreter_is_not_known(
    tmp_path: Path, running: Path, script: bytes, mode: int, hot: bool
) -> None:
    new = firmware(tmp_path, "new", lambda r: put(r, "/srv/app/start", script, mode))
    v = judge(running, new)
    assert v.hot is hot, v.summary()
    if not hot:
        assert v.reasons == ("native code in the app changed (/srv/app/start)",)


def test_a_shell_is_allowed_once_the_device_names_it_an_interpreter(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new", lambda r: put(r, "/srv/app/start", b"#!/bin/sh\n", 0o755))
    policy = Policy(APP, interpreter=(*DEFAULT_INTERPRETER, "/bin/sh"))
    assert inspect_slot(running, new, policy).hot
    assert not inspect_slot(running, new, Policy(APP)).hot


def test_bounds_on_what_the_new_firmware_makes_the_device_read(tmp_path: Path, running: Path) -> None:
    new = firmware(tmp_path, "new")
    size = (new / MANIFEST_PATH.lstrip("/")).stat().st_size
    small = inspect_slot(running, new, Policy(APP, max_manifest_size=size - 1))
    assert small.reasons[0] == (
        f"manifest unusable in the new firmware: manifest {MANIFEST_PATH} is larger than {size - 1} bytes"
    )
    few = inspect_slot(running, new, Policy(APP, max_manifest_entries=5))
    assert few.reasons[0].startswith(f"manifest unusable in the new firmware: manifest {MANIFEST_PATH} lists ")
    assert few.reasons[0].endswith("paths, more than 5 ([inspect] max_manifest_entries)")
    slow = inspect_slot(running, new, Policy(APP, hash_timeout=0))
    assert slow.reasons == (
        "app files could not be checked: hashing the new app files ([inspect] hash_timeout) took longer than 0 s",
    )
    assert inspect_slot(running, new, Policy(APP)).hot


def test_resource_reasons() -> None:
    installed = {"rootfs.img": (100, "a" * 128), "zImage": (10, "b" * 128), "sim.dtb": (5, "c" * 128)}
    same = dict(installed)
    assert resource_reasons(installed, same) == []
    assert resource_reasons(installed, {**installed, "rootfs.img": (101, "f" * 128)}) == []  # the manifest's job
    new = {"rootfs.img": (100, "a" * 128), "zImage": (12, "d" * 128), "boot.scr": (3, "e" * 128)}
    assert resource_reasons(installed, new) == [
        "firmware resource boot.scr added",
        "firmware resource sim.dtb removed",
        "firmware resource zImage changed (blake2b differs, 10 → 12 bytes)",
    ]
    assert resource_reasons({"zImage": (10, "b" * 128)}, {"zImage": (10, "9" * 128)}) == [
        "firmware resource zImage changed (blake2b differs)"
    ]
    assert resource_reasons({"root.squashfs": (1, "a")}, {"root.squashfs": (2, "b")}, rootfs="root.squashfs") == []
