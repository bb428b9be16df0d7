"""``sshfwup firmware …`` and ``sshfwup keys gen`` on the simulator's firmware.

The central property: ``firmware diff`` reaches exactly the verdict the device reaches for the
same pair. The device's verdict is computed here the device's way — ``inspect.inspect_slot``
on the two staging trees the firmware was packed from (what the device sees mounted) — and
compared with ``diff --json`` for every reboot reason and for the hot case.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import stat
import subprocess
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import asyncssh
import pytest
from conftest import output, upload

from sshfwup.host import firmware
from sshfwup.firmware.keys import load_private_key, load_public_key
from sshfwup.firmware.archive import read_firmware
from sshfwup.firmware.inspect import decide, inspect_slot
from sshfwup.firmware.manifest import (
    MANIFEST_PATH,
    MARKER_PATH,
    build_manifest,
    dump_manifest,
    load_manifest,
    write_manifest,
)
from sshfwup.sim.firmware import build_firmware, reference_conf
from sshfwup.sim.rootfs import build_sample_firmware, make_rootfs

pytestmark = pytest.mark.skipif(shutil.which("unsquashfs") is None, reason="needs squashfs-tools")

APP_DIRS = ("/srv/app",)


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = firmware.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def host(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


# --- firmware builds -------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    fw: Path
    staging: Path
    version: str


class Builds:
    """Sample firmware built once per session; each case on first use."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._cache: dict[str, Build] = {}

    def sample(self, name: str, version: str, **kwargs: Any) -> Build:
        if name not in self._cache:
            fw = build_sample_firmware(self.work, version=version, name=name, **kwargs)
            self._cache[name] = Build(fw, self.work / f"{name}.rootfs", version)
        return self._cache[name]

    def tweaked(self, name: str, version: str, tweak: Callable[[Path], None], **kwargs: Any) -> Build:
        """make_rootfs, then ``tweak`` the finished tree (after its manifest was written), then pack."""
        if name not in self._cache:
            staging = make_rootfs(self.work / f"{name}.rootfs", version=version, **kwargs)
            tweak(staging)
            fw = build_firmware(staging, self.work / f"{name}.fw", version=version)
            self._cache[name] = Build(fw, staging, version)
        return self._cache[name]

    @property
    def v1(self) -> Build:
        return self.sample("v1", "1.0.0")

    @property
    def v2(self) -> Build:  # app-only change
        return self.sample("v2", "2.0.0")

    @property
    def v3(self) -> Build:  # new kernel and native code in the app
        return self.sample("v3", "3.0.0", changes=["kernel", "native-app"])


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    return Builds(tmp_path_factory.mktemp("firmware"))


# Tree tweaks for the cases the sample builder does not make by itself ----------------------


def _tamper_app(root: Path) -> None:
    app = host(root, "/srv/app/app.py")
    app.write_bytes(app.read_bytes() + b"\n# changed after the manifest was written\n")


def _corrupt_manifest(root: Path) -> None:
    host(root, MANIFEST_PATH).write_text("{ this is not json")


def _garbage_marker(root: Path) -> None:
    host(root, MARKER_PATH).write_text("maybe\n")


def _manifest_is_directory(root: Path) -> None:
    m = host(root, MANIFEST_PATH)
    m.unlink()
    m.mkdir()
    (m / "inside").write_text("x")


def _symlink_loop(root: Path) -> None:
    m = host(root, MANIFEST_PATH)
    m.unlink()
    m.symlink_to("manifest.json")


def _symlinks(root: Path) -> None:
    """Manifest reached through an absolute directory symlink and a relative file symlink; the
    marker through a relative symlink with "..": the device follows all of them in the slot."""
    meta = host(root, "/usr/share/sshfwup")
    host(root, "/opt").mkdir(exist_ok=True)
    meta.rename(host(root, "/opt/meta"))
    meta.symlink_to("/opt/meta")
    real = host(root, "/opt/meta/m.json")
    host(root, "/opt/meta/manifest.json").rename(real)
    host(root, "/opt/meta/manifest.json").symlink_to("m.json")
    marker = host(root, MARKER_PATH)
    marker.rename(host(root, "/etc/hot"))
    marker.symlink_to("../../etc/hot")


def _patch_manifest(root: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = host(root, MANIFEST_PATH)
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _exclude_what_changed(root: Path) -> None:
    """A hostile build: its manifest excludes the very paths it changes."""
    _patch_manifest(root, lambda doc: doc["excluded"].extend(["/etc", "/boot"]))


def _claim_not_native(root: Path) -> None:
    _patch_manifest(root, lambda doc: doc["entries"]["/srv/app/helper"].update(native=False))


def _shell_script_in_app(root: Path) -> None:
    start = host(root, "/srv/app/start")
    start.write_bytes(b"#!/bin/sh\nexec python3 app.py\n")
    start.chmod(0o755)
    write_manifest(root, build_manifest(root, app_dirs=["/srv/app"], kernel="/boot/zImage", dtbs=["/boot/sim.dtb"]))


@dataclass(frozen=True)
class Case:
    name: str
    expect: str | None  # a reason that must appear; None: hot
    kwargs: dict[str, Any]
    tweak: Callable[[Path], None] | None = None
    old: str = "v1"  # "v1", or "nomanifest" for a running firmware without a manifest


CASES = [
    Case("hot", None, {}),
    Case("kernel", "kernel changed", {"changes": ["kernel"]}),
    Case("dtb", "device tree changed (sim.dtb)", {"changes": ["dtb"]}),
    Case("interpreter", "interpreter changed (/usr/bin/python3)", {"changes": ["interpreter"]}),
    Case("native-so", "native code in the app changed (/srv/app/_speedups.so)", {"changes": ["native-app"]}),
    Case("app-executable", "native code in the app changed (/srv/app/helper)", {"changes": ["app-executable"]}),
    Case("system-file", "/etc changed (/etc/sshfwup-sim.conf)", {"changes": ["system-file"]}),
    Case("modules", "/lib/modules changed", {"changes": ["modules"]}),
    Case("marker-missing", "HOT_RELOAD marker missing", {"hot": None}),
    Case("marker-false", "HOT_RELOAD marker says false", {"hot": False}),
    Case("marker-garbage", "must say true or false", {}, _garbage_marker),
    Case("manifest-missing", "manifest missing in the new firmware", {"manifest": False}),
    Case("manifest-missing-running", "manifest missing in the running firmware", {}, old="nomanifest"),
    Case("manifest-corrupt", "manifest unusable in the new firmware", {}, _corrupt_manifest),
    Case("manifest-directory", "is a directory, not a file", {}, _manifest_is_directory),
    Case("manifest-symlink-loop", "too many levels of symbolic links", {}, _symlink_loop),
    Case("app-files-tampered", "app files do not match the manifest (/srv/app/app.py)", {}, _tamper_app),
    Case("symlinks-hot", None, {}, _symlinks),
    Case("everything", "kernel changed", {"changes": ["kernel", "dtb", "modules", "system-file", "interpreter"]}),
    Case("new-manifest-excludes", "kernel changed", {"changes": ["kernel", "system-file"]}, _exclude_what_changed),
    Case("elf-claimed-not-native", "native code in the app changed (/srv/app/helper)", {"changes": ["app-executable"]},
         _claim_not_native),  # fmt: skip
    Case("shebang-outside-the-app", "native code in the app changed (/srv/app/start)", {}, _shell_script_in_app),
]


def _build_case(builds: Builds, case: Case) -> tuple[Build, Build]:
    old = builds.v1 if case.old == "v1" else builds.sample("nomanifest", "0.9.0", manifest=False)
    if case.tweak is None:
        new = builds.sample(case.name, "2.1.0", **case.kwargs)
    else:
        new = builds.tweaked(case.name, "2.1.0", case.tweak, **case.kwargs)
    return old, new


def _device_verdict(old: Build, new: Build) -> dict[str, Any]:
    """What the device concludes: inspect_slot on the trees it would have mounted."""
    verdict = inspect_slot(old.staging, new.staging, app_dirs=APP_DIRS)
    return replace(verdict, old_version=old.version, new_version=new.version).to_json()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_diff_reaches_the_devices_verdict(builds: Builds, case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _build_case(builds, case)
    rc, out, err = run(capsys, "firmware", "diff", old.fw, new.fw, "--app-dir", "/srv/app", "--json")
    assert rc == 0, err
    result = json.loads(out)
    device = _device_verdict(old, new)
    assert result["verdict"] == device
    assert result["hot"] is (case.expect is None)
    if case.expect is not None:
        assert any(case.expect in r for r in result["reasons"]), result["reasons"]
    assert result["changed_in_app"] == [c["path"] for c in device["changes"] if c["in_app"]]
    assert result["changed_outside_app"] == [c["path"] for c in device["changes"] if not c["in_app"]]


def test_diff_default_app_dirs_come_from_the_running_manifest(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "firmware", "diff", builds.v1.fw, builds.v2.fw, "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["app_dirs"] == ["/srv/app"]
    assert result["app_dirs_source"] == "the running firmware's manifest"  # never the new one's claim
    assert result["verdict"] == _device_verdict(builds.v1, builds.v2)


def test_diff_text_output_lists_reasons_and_changes(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "firmware", "diff", builds.v2.fw, builds.v3.fw)
    assert rc == 0
    assert "verdict: reboot required" in out
    assert "  - kernel changed" in out
    assert "  - native code in the app changed (/srv/app/_speedups.so)" in out
    assert "changed  /boot/zImage (content)" in out
    assert "added    /srv/app/_speedups.so" in out
    assert "changes outside the app: 1" in out


def test_diff_v1_v2_is_hot(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "firmware", "diff", builds.v1.fw, builds.v2.fw)
    assert rc == 0
    assert "verdict: hot reload" in out
    assert "changed  /srv/app/VERSION (content)" in out


def test_fail_on_reboot_exit_status(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "firmware", "diff", builds.v2.fw, builds.v3.fw, "--fail-on-reboot")[0] == 3
    assert run(capsys, "firmware", "diff", builds.v1.fw, builds.v2.fw, "--fail-on-reboot")[0] == 0
    assert run(capsys, "firmware", "diff", builds.v2.fw, builds.v3.fw)[0] == 0


def test_diff_with_device_config_mirrors_an_unsupervised_device(
    builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sshfwup.toml"
    config.write_text('[inspect]\ninterpreter = ["/usr/bin/python3*"]\n')  # [app] command empty
    rc, out, _ = run(capsys, "firmware", "diff", builds.v1.fw, builds.v2.fw, "--config", config, "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["hot"] is False
    assert result["reasons"] == [firmware.NO_APP_REASON]
    config.write_text('[app]\ncommand = ["python3", "{app_dir}/app.py"]\napp_dir = "/srv/app"\n')
    rc, out, _ = run(capsys, "firmware", "diff", builds.v1.fw, builds.v2.fw, "--config", config, "--json")
    assert json.loads(out)["hot"] is True
    assert json.loads(out)["app_dirs_source"] == str(config)


def test_diff_warns_about_another_platform(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    other = builds.sample("otherboard", "2.0.0", platform="otherboard")
    rc, out, _ = run(capsys, "firmware", "diff", builds.v1.fw, other.fw, "--json")
    assert rc == 0
    assert any("platform differs" in w for w in json.loads(out)["warnings"])


def test_diff_usage_errors(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "firmware", "diff", builds.v1.fw)
    assert rc == 2 and "give two firmware files" in err
    rc, _, err = run(capsys, "firmware", "diff", builds.v1.fw, builds.v2.fw, "--running-fw", builds.v1.fw)
    assert rc == 2 and "--running" in err


def test_diff_refuses_a_broken_archive(builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "half.fw"
    data = builds.v2.fw.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    rc, out, err = run(capsys, "firmware", "diff", builds.v1.fw, broken)
    assert rc == 1
    assert str(broken) in err and out == ""
    rc, _, err = run(capsys, "firmware", "diff", builds.v1.fw, tmp_path / "nope.fw")
    assert rc == 1 and "no such file" in err


def test_real_fwup_archives(capsys: pytest.CaptureFixture[str]) -> None:
    """fwup-made archives (tests/data/fwup-1.16): squashfs root filesystems without a manifest;
    v2 carries HOT_RELOAD=true."""
    samples = Path(__file__).resolve().parents[1] / "data" / "fwup-1.16"
    rc, out, _ = run(capsys, "firmware", "info", samples / "v2.fw", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["uuid"] == "23467865-22b0-52db-8307-f50ab5e756c3"  # fwup -m says so (fwup-metadata-v2.txt)
    assert info["creation_date"] == "2023-11-14T22:13:20Z"
    assert [r["name"] for r in info["resources"]] == ["zImage", "rootfs.img"]
    assert info["rootfs"]["marker"] == {"present": True, "hot": True}
    assert info["rootfs"]["manifest"] == {"present": False}
    rc, out, _ = run(capsys, "firmware", "diff", samples / "v1.fw", samples / "v2.fw", "--json")
    assert rc == 0
    expected = replace(decide(None, None, True, app_dirs=APP_DIRS), old_version="1.0.0", new_version="2.0.0")
    # the samples' kernels (their zImage resources) differ too: every resource of the .fw counts
    expected = replace(expected, reasons=(*expected.reasons, "firmware resource zImage changed (blake2b differs)"))
    assert json.loads(out)["verdict"] == expected.to_json()


def test_diff_refuses_a_non_squashfs_rootfs(
    builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str], fwup: str
) -> None:
    image = tmp_path / "rootfs.ext4"
    image.write_bytes(b"\0" * 8192)
    fw = tmp_path / "ext4.fw"
    env = {**os.environ, "ROOTFS": str(image), "NERVES_FW_VERSION": "9.0.0"}
    subprocess.run([fwup, "-c", "-f", str(reference_conf()), "-o", str(fw)], env=env, check=True, capture_output=True)
    rc, _, err = run(capsys, "firmware", "diff", builds.v1.fw, fw)
    assert rc == 1
    assert "not a squashfs image" in err
    rc, out, _ = run(capsys, "firmware", "info", fw, "--json")
    assert rc == 0  # the archive itself is fine; only its root filesystem cannot be read here
    assert "not a squashfs image" in json.loads(out)["rootfs"]["error"]


# --- manifest / mark ---------------------------------------------------------------------------


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs", version="5.0.0", hot=None, manifest=False)


def test_manifest_writes_the_same_manifest_as_the_library(staging: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(
        capsys, "firmware", "manifest", staging, "--app-dir", "/srv/app",
        "--kernel", "/boot/zImage", "--dtb", "/boot/sim.dtb", "--hot",
    )  # fmt: skip
    assert rc == 0, err
    assert host(staging, MARKER_PATH).read_bytes() == b"true\n"
    written = host(staging, MANIFEST_PATH).read_bytes()
    expected = build_manifest(staging, app_dirs=["/srv/app"], kernel="/boot/zImage", dtbs=["/boot/sim.dtb"])
    assert written == dump_manifest(expected)
    manifest = load_manifest(written)
    assert manifest.kernel == "/boot/zImage" and manifest.dtbs == ("/boot/sim.dtb",)
    assert len(out.strip().splitlines()) == 1
    assert f"{len(manifest.entries)} entries" in out
    assert "next build claims: hot reload (app-only change)" in out


def test_manifest_records_a_kernel_from_the_build_machine(
    staging: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "images" / "zImage"
    kernel.parent.mkdir()
    kernel.write_bytes(b"kernel image")
    rc, out, _ = run(capsys, "firmware", "manifest", staging, "--kernel", kernel, "--reboot")
    assert rc == 0
    manifest = load_manifest(host(staging, MANIFEST_PATH))
    assert manifest.kernel == "@kernel"
    assert manifest.entries["@kernel"].size == len(b"kernel image")
    assert host(staging, MARKER_PATH).read_bytes() == b"false\n"
    assert "next build claims: reboot required" in out


def test_manifest_keeps_an_existing_marker_and_says_when_there_is_none(
    staging: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "firmware", "manifest", staging)
    assert rc == 0
    assert not host(staging, MARKER_PATH).exists()
    assert "HOT_RELOAD missing" in out and "reboot required" in out
    run(capsys, "firmware", "mark", "--hot", staging)
    rc, out, _ = run(capsys, "firmware", "manifest", staging)
    assert host(staging, MARKER_PATH).read_bytes() == b"true\n"
    assert "next build claims: hot reload" in out


def test_manifest_errors(staging: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "firmware", "manifest", tmp_path / "missing")
    assert rc == 1 and "not a directory" in err
    rc, _, err = run(capsys, "firmware", "manifest", staging, "--kernel", "/boot/vmlinuz-nope")
    assert rc == 1 and "--kernel /boot/vmlinuz-nope" in err
    assert not host(staging, MANIFEST_PATH).exists()
    rc, _, err = run(capsys, "firmware", "manifest", staging, "--hot", "--reboot")
    assert rc == 2
    rc, _, err = run(capsys, "firmware", "manifest", staging, "--app-dir", "/opt/nowhere")
    assert rc == 0 and "app directory /opt/nowhere does not exist" in err


@pytest.mark.parametrize(
    ("flag", "content", "claim"),
    [("--hot", b"true\n", "next build claims: hot reload (app-only change)"),
     ("--reboot", b"false\n", "next build claims: reboot required")],
)  # fmt: skip
def test_mark(staging: Path, flag: str, content: bytes, claim: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "firmware", "mark", flag, staging)
    assert rc == 0
    assert host(staging, MARKER_PATH).read_bytes() == content
    assert claim in out
    assert stat.S_IMODE(host(staging, MARKER_PATH).stat().st_mode) == 0o644


def test_mark_needs_a_choice_and_a_tree(staging: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "firmware", "mark", staging)[0] == 2
    rc, _, err = run(capsys, "firmware", "mark", "--hot", tmp_path / "typo")
    assert rc == 1 and "not a directory" in err
    assert not (tmp_path / "typo").exists()


def test_manifest_and_mark_feed_diff(builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The build flow end to end: stage, manifest + mark through the CLI, pack, diff."""
    tree = make_rootfs(tmp_path / "tree", version="2.5.0", hot=None, manifest=False)
    run(capsys, "firmware", "manifest", tree, "--kernel", "/boot/zImage", "--dtb", "/boot/sim.dtb")
    run(capsys, "firmware", "mark", "--hot", tree)
    fw = build_firmware(tree, tmp_path / "2.5.0.fw", version="2.5.0")
    rc, out, _ = run(capsys, "firmware", "diff", builds.v1.fw, fw, "--json")
    assert rc == 0
    assert json.loads(out)["hot"] is True


# --- info ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def signing(tmp_path_factory: pytest.TempPathFactory, builds: Builds) -> dict[str, Path]:
    keys = tmp_path_factory.mktemp("signing")
    assert firmware.main(["keys", "gen", "--firmware", "--out", str(keys / "right")]) == 0
    assert firmware.main(["keys", "gen", "--firmware", "--out", str(keys / "wrong")]) == 0
    signed = keys / "v2-signed.fw"
    assert firmware.main(["firmware", "sign", str(builds.v2.fw), "--private-key",
                          str(keys / "right" / "fwup-key.priv"), "-o", str(signed)]) == 0  # fmt: skip
    return {
        "signed": signed,
        "right": keys / "right" / "fwup-key.pub",
        "wrong": keys / "wrong" / "fwup-key.pub",
        "private": keys / "right" / "fwup-key.priv",
    }


def test_info_unsigned(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "firmware", "info", builds.v2.fw, "--json")
    assert rc == 0
    info = json.loads(out)
    archive = read_firmware(builds.v2.fw)
    assert info["version"] == "2.0.0"
    assert info["platform"] == "sshfwup-sim" and info["architecture"] == "x86_64"
    assert info["product"] == "sshfwup simulated device"
    assert info["uuid"] == archive.uuid
    assert info["signature"] == {"present": False, "valid": None, "key": None}
    assert [r["name"] for r in info["resources"]] == ["rootfs.img"]
    assert info["resources"][0]["size"] == archive.meta.resources["rootfs.img"].length
    rootfs = info["rootfs"]
    manifest = load_manifest(host(builds.v2.staging, MANIFEST_PATH))
    assert rootfs["marker"] == {"present": True, "hot": True}
    assert rootfs["manifest"]["entries"] == len(manifest.entries)
    assert rootfs["manifest"]["kernel"] == "/boot/zImage"
    assert rootfs["manifest"]["dtbs"] == ["/boot/sim.dtb"]
    assert rootfs["app_mismatches"] == []


def test_info_text(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "firmware", "info", builds.v3.fw)
    assert rc == 0
    assert "version:       3.0.0" in out
    assert "signature:     none (unsigned)" in out
    assert "HOT_RELOAD:  true" in out
    assert "native code in the app: /srv/app/_speedups.so" in out
    assert "app files:   match the manifest" in out


def test_info_reports_missing_marker_and_manifest(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    bare = builds.sample("bare", "0.1.0", hot=None, manifest=False)
    rc, out, _ = run(capsys, "firmware", "info", bare.fw, "--json")
    assert rc == 0
    rootfs = json.loads(out)["rootfs"]
    assert rootfs["marker"] == {"present": False, "hot": None}
    assert rootfs["manifest"] == {"present": False}
    assert rootfs["app_mismatches"] is None


def test_info_finds_tampered_app_files(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    tampered = builds.tweaked("app-files-tampered", "2.1.0", _tamper_app)
    rc, out, _ = run(capsys, "firmware", "info", tampered.fw)
    assert rc == 0
    assert "DO NOT match the manifest: /srv/app/app.py" in out


def test_info_signed_with_the_right_and_a_wrong_key(
    signing: dict[str, Path], builds: Builds, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = run(capsys, "firmware", "info", signing["signed"], "--public-key", signing["right"], "--json")
    assert rc == 0
    assert json.loads(out)["signature"] == {"present": True, "valid": True, "key": str(signing["right"])}
    rc, out, _ = run(capsys, "firmware", "info", signing["signed"], "--public-key", signing["wrong"], "--json")
    assert rc == 1
    assert json.loads(out)["signature"] == {"present": True, "valid": False, "key": None}
    rc, out, _ = run(capsys, "firmware", "info", signing["signed"], "--public-key", signing["wrong"],
                     "--public-key", signing["right"])  # fmt: skip
    assert rc == 0 and f"valid ({signing['right']})" in out
    rc, out, _ = run(capsys, "firmware", "info", signing["signed"])
    assert rc == 0 and "present (not checked" in out
    rc, out, _ = run(capsys, "firmware", "info", builds.v2.fw, "--public-key", signing["right"])
    assert rc == 1 and "none (unsigned)" in out


# --- sign ------------------------------------------------------------------------------------------


def test_sign_layout_and_uuid(signing: dict[str, Path], builds: Builds) -> None:
    names = [i.filename for i in zipfile.ZipFile(signing["signed"]).infolist()]
    assert names[:2] == ["meta.conf.ed25519", "meta.conf"]
    assert names[2:] == ["data/rootfs.img"]
    signed, unsigned = read_firmware(signing["signed"]), read_firmware(builds.v2.fw)
    assert signed.uuid == unsigned.uuid  # the signature does not change the firmware's identity
    assert signed.meta_conf == unsigned.meta_conf


def test_sign_in_place_and_resign(
    signing: dict[str, Path], builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "v2.fw"
    shutil.copy(builds.v2.fw, copy)
    rc, out, _ = run(capsys, "firmware", "sign", copy, "--private-key", signing["private"])
    assert rc == 0
    public = base64.b64encode(load_public_key(signing["right"])).decode()
    assert public in out
    assert run(capsys, "firmware", "info", copy, "--public-key", signing["right"])[0] == 0
    # re-signing replaces the signature rather than adding a second one
    other = tmp_path / "other"
    assert firmware.main(["keys", "gen", "--firmware", "--out", str(other)]) == 0
    assert run(capsys, "firmware", "sign", copy, "--private-key", other / "fwup-key.priv")[0] == 0
    assert [i.filename for i in zipfile.ZipFile(copy).infolist()].count("meta.conf.ed25519") == 1
    assert run(capsys, "firmware", "info", copy, "--public-key", signing["right"])[0] == 1
    assert run(capsys, "firmware", "info", copy, "--public-key", other / "fwup-key.pub")[0] == 0


def test_sign_errors(builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_key = tmp_path / "bad.priv"
    bad_key.write_text("not a key")
    rc, _, err = run(capsys, "firmware", "sign", builds.v2.fw, "--private-key", bad_key, "-o", tmp_path / "x.fw")
    assert rc == 1 and "not an fwup private key" in err
    assert not (tmp_path / "x.fw").exists()
    assert run(capsys, "firmware", "sign", builds.v2.fw)[0] == 2  # --private-key is required


# --- keys gen ----------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_gen_all(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "keys"
    rc, out, _ = run(capsys, "keys", "gen", "--out", out_dir)
    assert rc == 0
    expected = {
        "fwup-key.priv": 0o600, "fwup-key.pub": 0o644,
        "ssh_host_ed25519_key": 0o600, "ssh_host_ed25519_key.pub": 0o644,
        "id_ed25519": 0o600, "id_ed25519.pub": 0o644,
    }  # fmt: skip
    assert {p.name: _mode(p) for p in out_dir.iterdir()} == expected
    private = load_private_key(out_dir / "fwup-key.priv")
    assert private[32:] == load_public_key(out_dir / "fwup-key.pub")
    for name in ("ssh_host_ed25519_key", "id_ed25519"):
        key = asyncssh.read_private_key(out_dir / name)
        assert key.algorithm == b"ssh-ed25519"
        public = asyncssh.read_public_key(out_dir / f"{name}.pub")
        assert public.export_public_key() == key.export_public_key()
    host_key = asyncssh.read_private_key(out_dir / "ssh_host_ed25519_key")
    assert host_key.get_fingerprint() in out


def test_keys_gen_never_overwrites_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "keys"
    assert run(capsys, "keys", "gen", "--firmware", "--out", out_dir)[0] == 0
    before = (out_dir / "fwup-key.priv").read_bytes()
    rc, _, err = run(capsys, "keys", "gen", "--out", out_dir)  # all kinds: firmware ones exist
    assert rc == 1 and "already exist" in err
    assert (out_dir / "fwup-key.priv").read_bytes() == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["fwup-key.priv", "fwup-key.pub"]  # nothing else written
    assert run(capsys, "keys", "gen", "--firmware", "--out", out_dir, "--force")[0] == 0
    assert (out_dir / "fwup-key.priv").read_bytes() != before
    assert _mode(out_dir / "fwup-key.priv") == 0o600


def test_keys_gen_only_what_is_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "keys", "gen", "--ssh-client", "--out", tmp_path / "k")[0] == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["id_ed25519", "id_ed25519.pub"]
    assert _mode(tmp_path / "k") == 0o700


def test_keys_gen_private_mode_ignores_umask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = os.umask(0)
    try:
        assert run(capsys, "keys", "gen", "--ssh-host", "--out", tmp_path)[0] == 0
    finally:
        os.umask(old)
    assert _mode(tmp_path / "ssh_host_ed25519_key") == 0o600
    assert _mode(tmp_path / "ssh_host_ed25519_key.pub") == 0o644


# --- --help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["firmware", "--help"], ["firmware", "manifest", "--help"], ["firmware", "mark", "--help"],
     ["firmware", "info", "--help"], ["firmware", "diff", "--help"], ["firmware", "sign", "--help"],
     ["keys", "gen", "--help"]],
)  # fmt: skip
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, *argv)
    assert rc == 0
    assert out.startswith("usage: sshfwup ")


def test_top_level_cli_delegates(builds: Builds, capsys: pytest.CaptureFixture[str]) -> None:
    from sshfwup.cli import main as cli_main

    assert cli_main(["firmware", "info", str(builds.v1.fw), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "1.0.0"


# --- diff --running against a stub device --------------------------------------------------------------


class StatusStub:
    """A tiny SSH server on 127.0.0.1 that answers ``status --json`` like an sshfwup device."""

    def __init__(self, client_public_key: str) -> None:
        self.status: dict[str, Any] = {}
        self.commands: list[str] = []
        self._authorized = asyncssh.import_authorized_keys(client_public_key)
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncssh.SSHAcceptor | None = None
        self.port = 0

    def _handle(self, process: asyncssh.SSHServerProcess) -> None:
        self.commands.append(process.command or "")
        if process.command == "status --json":
            process.stdout.write(json.dumps(self.status) + "\n")
            process.exit(0)
        else:
            process.stderr.write(f"Error: command not allowed: {process.command!r}\n")
            process.exit(1)

    def __enter__(self) -> Self:
        async def start() -> asyncssh.SSHAcceptor:
            return await asyncssh.create_server(
                asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[self._host_key],
                authorized_client_keys=self._authorized, process_factory=self._handle,
            )  # fmt: skip

        self._thread.start()
        try:
            self._server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=10)
        except BaseException:
            self._stop_loop()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        finally:
            self._stop_loop()


@pytest.fixture
def device(tmp_path: Path) -> Iterator[tuple[StatusStub, Path]]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "id_ed25519"
    key.write_private_key(key_file)
    key_file.chmod(0o600)
    with StatusStub(key.export_public_key().decode()) as stub:
        yield stub, key_file


def _status(slot: str, version: str, uuid: str, **extra: Any) -> dict[str, Any]:
    other = "b" if slot == "a" else "a"
    return {
        "running_root": slot, "active": slot, "validated": True, "pending_reboot": False,
        "slots": {slot: {"version": version, "uuid": uuid}, other: {"version": None, "uuid": None}},
        "boot_env_error": None, "app": None, "update_in_progress": False, **extra,
    }  # fmt: skip


def _running(stub: StatusStub, key: Path, new: Path, *running_fw: Path, json_out: bool = True) -> list[str | Path]:
    argv: list[str | Path] = ["firmware", "diff", "--running", "127.0.0.1", new, "-p", str(stub.port),
                              "-i", key, "--insecure-accept-host-key"]  # fmt: skip
    for f in running_fw:
        argv += ["--running-fw", f]
    return argv + (["--json"] if json_out else [])


def test_running_diff_picks_the_running_firmware(
    device: tuple[StatusStub, Path], builds: Builds, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stub, key = device
    v1_uuid = read_firmware(builds.v1.fw).uuid
    stub.status = _status("a", "1.0.0", v1_uuid)
    builds.v3  # noqa: B018 - make sure the directory holds several firmware files
    rc, out, err = run(capsys, *_running(stub, key, builds.v3.fw, builds.work))  # a directory of releases
    assert rc == 0, err
    result = json.loads(out)
    assert result["running"]["uuid"] == v1_uuid
    assert result["running"]["file"] == str(builds.v1.fw)
    assert result["verdict"] == _device_verdict(builds.v1, builds.v3)
    assert stub.commands == ["status --json"]
    # --delta: the patch that would be sent is made from the file the device runs
    from sshfwup.host.firmware_delta import make_patch

    rc, out, err = run(capsys, *_running(stub, key, builds.v3.fw, builds.work), "--delta")
    assert rc == 0, err
    expected = make_patch(builds.v1.fw, builds.v3.fw, tmp_path / "v1-to-v3.fw")
    assert json.loads(out)["delta"]["patch_size"] == expected.size


def test_running_diff_says_when_no_file_is_the_running_firmware(
    device: tuple[StatusStub, Path], builds: Builds, capsys: pytest.CaptureFixture[str]
) -> None:
    stub, key = device
    stub.status = _status("b", "1.0.0", "00000000-0000-5000-8000-000000000000")
    rc, out, err = run(capsys, *_running(stub, key, builds.v2.fw, builds.v1.fw))
    assert rc == 1 and out == ""
    assert "runs firmware 1.0.0 (uuid 00000000-0000-5000-8000-000000000000) from slot b" in err
    assert "no given file is that firmware" in err


def test_running_diff_refuses_what_the_device_refuses(
    device: tuple[StatusStub, Path], builds: Builds, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pending reboot: the device refuses every upload, so the prediction does too (exit 4,
    with the device's words), and --fail-on-reboot does not pass it."""
    stub, key = device
    stub.status = _status("a", "1.0.0", read_firmware(builds.v1.fw).uuid, active="b", pending_reboot=True)
    rc, out, _ = run(capsys, *_running(stub, key, builds.v2.fw, builds.v1.fw, json_out=False))
    assert rc == 4, out
    assert "device:  127.0.0.1 runs slot a: 1.0.0" in out
    assert "verdict: REFUSED: the device would refuse this upload before fwup: a reboot is pending: slot b" in out
    assert "does not report its update rules" in out  # an older device: the default is assumed, and said
    rc, out, _ = run(capsys, *_running(stub, key, builds.v2.fw, builds.v1.fw), "--fail-on-reboot")
    assert rc == 4 and json.loads(out)["device"]["kind"] == "state"


def test_running_diff_applies_the_reported_signature_rule(
    device: tuple[StatusStub, Path], builds: Builds, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from sshfwup.firmware.keys import generate_keypair

    stub, key = device
    _, public = generate_keypair()
    rules = {"allow_downgrade": False, "signed_only": True, "public_keys": [public.strip()]}
    stub.status = _status("a", "1.0.0", read_firmware(builds.v1.fw).uuid, update_rules=rules)
    rc, out, _ = run(capsys, *_running(stub, key, builds.v2.fw, builds.v1.fw))
    result = json.loads(out)
    assert rc == 4 and result["device"]["kind"] == "signature" and result["device"]["signature"] == "unsigned"
    assert "Expecting signed firmware archive." in result["device"]["refusal"]
    assert result["device"]["rules_source"] == "as 127.0.0.1 reports them (status --json: update_rules)"
    stub.status = _status("a", "1.0.0", read_firmware(builds.v1.fw).uuid,
                          update_rules={**rules, "signed_only": False, "public_keys": []})  # fmt: skip
    rc, out, _ = run(capsys, *_running(stub, key, builds.v2.fw, builds.v1.fw))
    assert rc == 0 and json.loads(out)["device"]["refusal"] is None


def test_running_diff_needs_running_fw_and_a_uuid(
    device: tuple[StatusStub, Path], builds: Builds, capsys: pytest.CaptureFixture[str]
) -> None:
    stub, key = device
    rc, _, err = run(capsys, *_running(stub, key, builds.v2.fw))
    assert rc == 1 and "--running needs --running-fw" in err
    assert stub.commands == []  # refused before connecting
    stub.status = _status("a", "1.0.0", "")
    rc, _, err = run(capsys, *_running(stub, key, builds.v2.fw, builds.v1.fw))
    assert rc == 1 and "records no firmware uuid for the running slot a" in err


def test_running_diff_connection_refused(builds: Builds, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, _, err = run(capsys, "firmware", "diff", "--running", "127.0.0.1", builds.v2.fw, "--running-fw",
                     builds.v1.fw, "-p", str(port), "--insecure-accept-host-key")  # fmt: skip
    assert rc == 1 and f"cannot connect to 127.0.0.1:{port}" in err


# --- diff --running against the simulated device: the prediction is the device's answer ---------


async def _diff_running(sim: Any, new: Path, running_fw: Path, capsys: pytest.CaptureFixture[str],
                        *extra: str) -> tuple[int, str]:  # fmt: skip
    import anyio

    argv = ["firmware", "diff", "--running", f"root@{sim.host}", str(new), "-p", str(sim.port), "-i",
            str(sim.key.private), "--insecure-accept-host-key", "--running-fw", str(running_fw), *extra]  # fmt: skip
    rc = await anyio.to_thread.run_sync(lambda: firmware.main(argv))
    return rc, capsys.readouterr().out


async def test_running_diff_predicts_the_devices_downgrade_refusal(
    sim: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    make = request.getfixturevalue("firmware")  # (the name `firmware` is the CLI module here)
    rc, out = await _diff_running(sim, make("0.9.0"), make("1.0.0"), capsys, "--json", "--fail-on-reboot")
    predicted = json.loads(out)["device"]
    assert rc == 4 and predicted["kind"] == "downgrade", out
    assert predicted["rules_source"].endswith("reports them (status --json: update_rules)")
    result = await upload(sim, make("0.9.0"))
    assert result.returncode == 1 and predicted["refusal"] in output(result), (predicted, output(result))
    assert sim.env()["nerves_fw_active"] == "a"
    # allowed on the device: then the prediction goes on to the verdict
    await sim.restart_server(update={"allow_downgrade": True})
    rc, out = await _diff_running(sim, make("0.9.0"), make("1.0.0"), capsys, "--json")
    assert rc == 0 and json.loads(out)["device"] == {**predicted, "refusal": None, "kind": None, "downgrade": True,
                                                     "rules": {"allow_downgrade": True, "signed_only": False}}


async def test_running_diff_predicts_the_devices_pending_reboot_refusal(
    sim: Any, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    make = request.getfixturevalue("firmware")
    assert (await upload(sim, make("2.0.0"))).returncode == 0  # hot swap: slot b boots next
    rc, out = await _diff_running(sim, make("3.0.0"), make("1.0.0"), capsys, "--json")
    predicted = json.loads(out)["device"]
    assert rc == 4 and predicted["kind"] == "state" and predicted["refusal"].startswith("a reboot is pending"), out
    result = await upload(sim, make("3.0.0"))
    assert result.returncode == 1 and predicted["refusal"] in output(result), (predicted, output(result))
    rc, out = await _diff_running(sim, make("1.0.0"), make("1.0.0"), capsys)
    assert rc == 4 and "verdict: REFUSED" in out  # even the running firmware: the device refuses first
