"""deploy/: the systemd unit, fw_env.config, and the build scripts (run for real)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sshfwup.config import AppConfig
from sshfwup.firmware.archive import read_firmware
from sshfwup.firmware.manifest import MANIFEST_PATH, MARKER_PATH, load_manifest
from sshfwup.sim.layout import DEFAULT_LAYOUT
from sshfwup.sim.rootfs import make_rootfs

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "sshfwup.service"
SCRIPTS = [DEPLOY / "buildroot-post-build.sh", DEPLOY / "mksquashfs-flow.sh"]
SSHFWUP = f"{sys.executable} -m sshfwup"  # the CLI of this checkout, whatever is on PATH
HARDENING = (
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
    "ProtectControlGroups", "LockPersonality", "RestrictSUIDSGID", "PrivateDevices",
    "ProtectKernelModules", "SystemCallFilter", "CapabilityBoundingSet", "ReadWritePaths",
    "ProtectKernelLogs", "ProtectHostname", "ProtectProc", "RestrictNamespaces", "SystemCallArchitectures",
    "RestrictAddressFamilies", "Delegate", "PrivateMounts", "SystemCallErrorNumber",
)  # fmt: skip
# systemd-analyze security's exposure level of the unit (0 = locked down, 10 = exposed).
# Before issue 9: 8.4 ("EXPOSED"); see docs/security.md.
MAX_EXPOSURE = 4.5


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(s|min)?", value)
    assert m, f"unexpected time span {value!r}"
    return int(m.group(1)) * (60 if m.group(2) == "min" else 1)


# --- the systemd unit ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's program exists; on a build machine /usr/bin/sshfwup does
    # not, so the check runs on a copy whose only difference is an existing program.
    text = UNIT.read_text()
    assert "\nExecStart=/usr/bin/sshfwup serve --config /etc/sshfwup.toml\n" in text
    copy = tmp_path / "sshfwup.service"
    copy.write_text(text.replace("ExecStart=/usr/bin/sshfwup ", f"ExecStart={Path(sys.executable)} -m sshfwup "))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", "systemd-analyze warned:\n" + result.stderr + result.stdout


def test_unit_service_settings() -> None:
    service = unit_directives(UNIT.read_text())["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["always"]
    assert service["KillMode"] == ["control-group"]
    assert service["ExecStart"] == ["/usr/bin/sshfwup serve --config /etc/sshfwup.toml"]
    # stopping lets the app drain; starting lets it become ready
    assert seconds(service["TimeoutStopSec"][0]) > AppConfig().drain_timeout
    assert seconds(service["TimeoutStartSec"][0]) > AppConfig().ready_timeout


def test_unit_hardening_still_allows_devices_and_mounts() -> None:
    service = unit_directives(UNIT.read_text())["Service"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables"):
        assert service.get(key) == ["yes"], key
    assert service.get("PrivateDevices", ["no"]) == ["no"]  # fwup writes the disk, sshfwup mounts slots
    assert "DevicePolicy" not in service and "DeviceAllow" not in service
    assert service.get("ProtectClock", ["no"]) == ["no"]  # it adds a DeviceAllow= list
    for rule in service.get("SystemCallFilter", []):  # a deny list that leaves mount(2) & co. alone
        assert rule.startswith("~"), rule
        assert not {"@mount", "@privileged", "@setuid", "@reboot", "@system-service"} & set(rule[1:].split()), rule
    protect = service.get("ProtectSystem", ["no"])[0]
    if protect == "strict":
        writable = " ".join(service.get("ReadWritePaths", []))
        assert "/data" in writable and "/var/lock" in writable  # journal and host key; fw_setenv's lock
        assert service["RuntimeDirectory"] == ["sshfwup"]  # /run/sshfwup: the update lock, slot mounts


def test_unit_keeps_what_the_update_path_and_the_apps_room_need() -> None:
    service = unit_directives(UNIT.read_text())["Service"]
    caps = set(" ".join(service["CapabilityBoundingSet"]).split())
    needed = {
        "CAP_SYS_ADMIN",  # mount the new slot, flush block device buffers
        "CAP_NET_BIND_SERVICE",  # port 22
        "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP",  # the app's user, its empty bounding set
        "CAP_KILL", "CAP_SYS_PTRACE",  # signal and find the app's processes (another user's)
        "CAP_SYS_BOOT",  # reboot
    }  # fmt: skip
    assert needed <= caps, needed - caps
    assert service["Delegate"] == ["yes"] and service.get("ProtectControlGroups") == ["no"]  # the app's cgroups


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_security_exposure(tmp_path: Path) -> None:
    copy = tmp_path / "sshfwup.service"
    copy.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/sshfwup ", f"ExecStart={Path(sys.executable)} -m sshfwup "))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    print(f"systemd-analyze security: exposure {m.group(1)} (at most {MAX_EXPOSURE}; 8.4 before issue 9)")
    assert float(m.group(1)) <= MAX_EXPOSURE


def test_every_hardening_line_says_why() -> None:
    lines = UNIT.read_text().splitlines()
    for i, line in enumerate(lines):
        key = line.partition("=")[0].strip()
        if key in HARDENING and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_unit_is_enabled_for_boot() -> None:
    assert unit_directives(UNIT.read_text())["Install"]["WantedBy"] == ["multi-user.target"]


# --- fw_env.config -------------------------------------------------------------------------------


def test_fw_env_config_matches_the_layout() -> None:
    active = [ln.split() for ln in (DEPLOY / "fw_env.config").read_text().splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]  # fmt: skip
    assert active == [["/dev/mmcblk0", "0x100000", "0x20000"]]
    offset, size = DEFAULT_LAYOUT.uboot_env_span
    assert (int(active[0][1], 16), int(active[0][2], 16)) == (offset, size)
    conf = (DEPLOY / "fwup.conf").read_text()
    blocks = {k: int(v) for k, v in re.findall(r"define\((UBOOT_ENV_(?:OFFSET|COUNT)), (\d+)\)", conf)}
    assert (blocks["UBOOT_ENV_OFFSET"] * 512, blocks["UBOOT_ENV_COUNT"] * 512) == (offset, size)


# --- the scripts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable_and_parses(script: Path) -> None:
    assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_shellcheck_clean(script: Path) -> None:
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout


@pytest.fixture
def buildroot(tmp_path: Path) -> tuple[Path, Path]:
    target = make_rootfs(tmp_path / "target", version="1.0.0", hot=None, manifest=False)
    images = tmp_path / "images"
    images.mkdir()
    (images / "zImage").write_bytes(b"kernel" * 100)
    (images / "board.dtb").write_bytes(b"\xd0\x0d\xfe\xed dtb")
    return target, images


def post_build(target: Path, images: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SSHFWUP")}  # no leaks from the caller
    full.update(SSHFWUP=SSHFWUP, BINARIES_DIR=str(images), **env)
    return subprocess.run(
        [str(SCRIPTS[0]), str(target), "extra", "post-script", "args"],
        capture_output=True, text=True, env=full, timeout=60, check=False,
    )  # fmt: skip


def test_buildroot_post_build_hot(buildroot: tuple[Path, Path]) -> None:
    target, images = buildroot
    result = post_build(target, images, SSHFWUP_RELOAD="hot")
    assert result.returncode == 0, result.stderr
    assert (target / MARKER_PATH.lstrip("/")).read_bytes() == b"true\n"
    manifest = load_manifest(target / MANIFEST_PATH.lstrip("/"))
    assert manifest.kernel == "@kernel" and manifest.dtbs == ("@dtb/board.dtb",)
    assert manifest.entries["@kernel"].size == 600
    assert manifest.app_dirs == ("/srv/app",)
    assert "next build claims: hot reload" in result.stdout


def test_buildroot_post_build_keeps_a_marker_or_defaults_to_reboot(buildroot: tuple[Path, Path]) -> None:
    target, images = buildroot
    marker = target / MARKER_PATH.lstrip("/")
    result = post_build(target, images)
    assert result.returncode == 0, result.stderr
    assert marker.read_bytes() == b"false\n"  # no marker: the safe claim
    marker.write_bytes(b"true\n")  # what `sshfwup firmware mark --hot output/target` leaves
    result = post_build(target, images)
    assert result.returncode == 0, result.stderr
    assert marker.read_bytes() == b"true\n"
    result = post_build(target, images, SSHFWUP_RELOAD="reboot")
    assert marker.read_bytes() == b"false\n"


def test_buildroot_post_build_options(buildroot: tuple[Path, Path]) -> None:
    target, images = buildroot
    result = post_build(
        target, images, SSHFWUP_RELOAD="hot", SSHFWUP_KERNEL="/boot/zImage", SSHFWUP_DTBS="none",
        SSHFWUP_APP_DIRS="/srv/app /etc",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(target / MANIFEST_PATH.lstrip("/"))
    assert manifest.kernel == "/boot/zImage" and manifest.dtbs == ()
    assert manifest.app_dirs == ("/srv/app", "/etc")
    result = post_build(target, images, SSHFWUP_RELOAD="maybe")
    assert result.returncode == 2 and "SSHFWUP_RELOAD must be hot, reboot or unset" in result.stderr


def test_mksquashfs_flow(tmp_path: Path, fwup: str) -> None:
    staging = make_rootfs(tmp_path / "staging", version="4.0.0", hot=None, manifest=False)
    keys = tmp_path / "keys"
    assert subprocess.run([sys.executable, "-m", "sshfwup", "keys", "gen", "--firmware", "--out", str(keys)],
                          capture_output=True, check=False).returncode == 0  # fmt: skip
    out = tmp_path / "out" / "4.0.0.fw"
    env = {**os.environ, "SSHFWUP": SSHFWUP, "FWUP": fwup, "TMPDIR": str(tmp_path),
           "SSHFWUP_SIGNING_KEY": str(keys / "fwup-key.priv")}  # fmt: skip
    result = subprocess.run(
        [str(SCRIPTS[1]), str(staging), "4.0.0", str(out), "--hot"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.glob("sshfwup-build.*")) == []  # the work directory is cleaned up
    info = read_firmware(out)
    assert info.version == "4.0.0" and info.signature is not None
    assert "HOT_RELOAD:  true" in result.stdout  # the script's closing `firmware info`
    assert "signature:     present" in result.stdout
    shown = subprocess.run(
        [sys.executable, "-m", "sshfwup", "firmware", "info", str(out), "--json", "--public-key",
         str(keys / "fwup-key.pub")], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    rootfs = json.loads(shown.stdout)["rootfs"]
    assert rootfs["manifest"]["kernel"] == "/boot/zImage"
    assert rootfs["manifest"]["dtbs"] == ["/boot/sim.dtb"]
    assert rootfs["marker"]["hot"] is True
    assert rootfs["app_mismatches"] == []


def test_mksquashfs_flow_usage(tmp_path: Path) -> None:
    result = subprocess.run([str(SCRIPTS[1]), str(tmp_path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "usage:" in result.stderr
    result = subprocess.run([str(SCRIPTS[1]), str(tmp_path / "nope"), "1.0", str(tmp_path / "x.fw")],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 1 and "not a directory" in result.stderr


def test_buildroot_users_table_creates_the_app_user() -> None:
    lines = [ln for ln in (DEPLOY / "buildroot-users.txt").read_text().splitlines() if ln.strip()]
    assert len(lines) == 1
    # makeusers: username uid group gid password home shell groups comment
    user, uid, group, gid, password, home, shell, groups, *comment = lines[0].split()
    assert user == group == AppConfig().user and (uid, gid) == ("-1", "-1")  # a system id of its own
    assert password == "*" and home == "-" and shell == "/bin/false" and groups == "-" and comment
