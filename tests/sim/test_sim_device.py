"""The simulated device: provisioning, loop devices, mounts, config, and cleanup that always works."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import pwd
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshfwup.config import load_config
from sshfwup.sim.device import (
    MARKER_ENV,
    ProvisionError,
    SimDevice,
    SimError,
    cleanup,
    loop_devices,
    marked_processes,
    mounts,
)
from sshfwup.sim.layout import DEFAULT_LAYOUT
from sshfwup.sim.rootfs import build_sample_firmware
from sshfwup.sim.toml_write import TomlWriteError, dumps

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBa3yUx0fAke+4JhzDpB3S9d2lz3YrRXgk0d0FNnPNfb test@sim"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def firmware_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sample_firmware(tmp_path_factory.mktemp("fw"), version="1.0.0")


def leftovers(path: Path) -> tuple[list[str], list[str]]:
    """Mount points under ``path`` and loop devices over its disk image."""
    resolved = path.resolve()
    mounted = [str(m.mount_point) for m in mounts() if m.mount_point == resolved or resolved in m.mount_point.parents]
    loops = [loop.name for loop in loop_devices(resolved / "disk.img")]
    return mounted, loops


def assert_clean(path: Path) -> None:
    assert leftovers(path) == ([], [])
    assert marked_processes(path) == []


@pytest.fixture
def device_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "dev"
    try:
        yield path
    finally:
        cleanup(path)
    assert_clean(path)


@pytest.fixture
def device(device_dir: Path, firmware_v1: Path) -> SimDevice:
    return SimDevice.create(device_dir, firmware=firmware_v1, authorized_keys=[KEY], ssh_port=2201, app_port=8201)


# --- toml writer ------------------------------------------------------------------------------


def test_toml_round_trip() -> None:
    document = {
        "title": "x",
        "server": {
            "port": 22,
            "ratio": 0.25,
            "big": 1e300,
            "on": True,
            "off": False,
            "quote": 'say "hi"\\ \t\n\x01é',
            "list": ["a", 1, [2.5]],
            "empty": [],
            "slots": {"a": "/dev/loop0", "b": "/dev/loop1", "needs quoting": {"x": 1}},
            "odd key.with dot": "v",
        },
        "app": {},
    }
    assert tomllib.loads(dumps(document)) == document


def test_toml_special_floats() -> None:
    parsed = tomllib.loads(dumps({"t": {"inf": math.inf, "ninf": -math.inf, "nan": math.nan}}))
    assert parsed["t"]["inf"] == math.inf and parsed["t"]["ninf"] == -math.inf and math.isnan(parsed["t"]["nan"])


@pytest.mark.parametrize("bad", [None, b"bytes", object()])
def test_toml_refuses_unwritable_values(bad: object) -> None:
    with pytest.raises(TomlWriteError, match="server.x"):
        dumps({"server": {"x": bad}})


# --- provisioning ----------------------------------------------------------------------------


def test_create_provisions_like_a_factory(device: SimDevice, firmware_v1: Path) -> None:
    env = device.env()
    assert env["nerves_fw_active"] == "a"
    assert env["nerves_fw_validated"] == "1"
    assert env["a.nerves_fw_version"] == "1.0.0"
    assert device.read_slot_file("a", "/srv/app/VERSION") == b"1.0.0\n"
    assert device.disk.stat().st_size == DEFAULT_LAYOUT.disk_bytes
    assert device.fw_env_config.read_text() == f"{device.disk} 0x100000 0x20000\n"
    assert Path(device.fwup).name == "fwup" and os.access(device.fwup, os.X_OK)  # the real fwup on PATH
    # powered off after creation: nothing mounted, no loop device
    assert leftovers(device.path) == ([], [])


def test_create_formats_data_partition_with_authorized_keys(device: SimDevice) -> None:
    device.attach()
    device.mount_data()
    keys = device.data_dir / "sshfwup" / "authorized_keys"
    assert keys.read_text() == KEY + "\n"
    assert keys.stat().st_mode & 0o777 == 0o600
    data_mount = [m for m in mounts() if m.mount_point == device.data_dir]
    assert data_mount and data_mount[-1].fstype == "ext4"


def test_create_writes_the_server_config(device: SimDevice) -> None:
    config = load_config(device.config_path)
    d = device.path
    assert config.server.listen == "127.0.0.1" and config.server.port == 2201
    assert config.server.host_key == d / "data/sshfwup/ssh_host_ed25519_key"
    assert config.server.authorized_keys == (d / "data/sshfwup/authorized_keys",)
    runtime = Path("/run/sshfwup-sim") / str(d).lstrip("/")  # mount points the app's user reaches
    assert config.server.lock_file == runtime / "run/update.lock"
    assert config.fwup.path == device.fwup and config.fwup.devpath == d / "disk.img"
    assert config.device.fw_env_config == d / "fw_env.config"
    assert config.device.root_mount == runtime / "root"
    assert config.device.reboot_command == (sys.executable, "-m", "sshfwup.sim", "reboot", str(d))
    assert config.app.command[1:] == ("{app_dir}/app.py",)
    assert config.app.user == "sshfwup-app" and pwd.getpwnam("sshfwup-app").pw_uid != 0
    # how the machine finds the app's processes, and whose run they belong to (stale or not)
    assert config.app.pass_env == ("SSHFWUP_SIM_MACHINE", "SSHFWUP_SIM_OWNER")
    assert [str(s) for s in config.app.sockets] == ["tcp:127.0.0.1:8201"]
    assert config.app.sockets[0].name == "http"
    assert (config.app.ready, config.app.ready_timeout, config.app.drain_timeout, config.app.observe) == ("notify", 10, 5, 2)


def test_create_refuses_an_existing_device(device: SimDevice, firmware_v1: Path) -> None:
    with pytest.raises(SimError, match="already holds a simulated device"):
        SimDevice.create(device.path, firmware=firmware_v1, ssh_port=1, app_port=2)


def test_create_with_failing_fwup_leaves_nothing_behind(device_dir: Path, firmware_v1: Path) -> None:
    with pytest.raises(ProvisionError, match="fwup -t complete failed"):
        SimDevice.create(device_dir, firmware=firmware_v1, fwup="/bin/false", ssh_port=2201, app_port=8201)
    assert leftovers(device_dir) == ([], [])


def test_create_with_missing_firmware(device_dir: Path) -> None:
    with pytest.raises(ProvisionError, match="not found"):
        SimDevice.create(device_dir, firmware=device_dir / "nope.fw", ssh_port=2201, app_port=8201)


def test_open_reads_back_the_device(device: SimDevice) -> None:
    again = SimDevice.open(device.path)
    assert (again.layout, again.fwup, again.ssh_port, again.app_port) == (
        device.layout, device.fwup, device.ssh_port, device.app_port,
    )


def test_open_of_a_plain_directory_fails(tmp_path: Path) -> None:
    with pytest.raises(SimError, match="not a simulated device"):
        SimDevice.open(tmp_path)


# --- power: loop devices and mounts ------------------------------------------------------------


def test_attach_mount_unmount_detach(device: SimDevice) -> None:
    loops = device.attach()
    assert device.attach() == loops  # idempotent
    by_name = {loop.name: loop for loop in loop_devices(device.disk)}
    assert len(by_name) == 3
    for role in ("a", "b"):
        loop = by_name[loops[role]]
        assert (loop.offset, loop.sizelimit) == DEFAULT_LAYOUT.slot_span(role)
        assert loop.read_only
    assert not by_name[loops["app"]].read_only
    assert device.slot_device("a") == loops["a"]

    device.mount_data()
    device.mount_root("a")
    device.mount_root("a")  # idempotent
    device.mount_data()
    assert device.running_slot() == "a"
    assert (device.root_dir / "srv/app/VERSION").read_text() == "1.0.0\n"
    root_mounts = [m for m in mounts() if m.mount_point == device.root_dir]
    assert len(root_mounts) == 1 and root_mounts[0].fstype == "squashfs"
    with pytest.raises(OSError):
        (device.root_dir / "new-file").write_text("x")  # read-only

    device.unmount_all()
    device.unmount_all()
    assert leftovers(device.path)[0] == []
    assert device.running_slot() is None
    device.detach()
    device.detach()
    assert leftovers(device.path) == ([], [])
    with pytest.raises(SimError, match="powered off"):
        device.slot_device("a")


def test_mounting_an_empty_slot_fails_clearly(device: SimDevice) -> None:
    device.attach()
    with pytest.raises(SimError, match="mounting slot b"):
        device.mount_root("b")


def test_unmount_all_takes_nested_mounts_deepest_first(device: SimDevice) -> None:
    device.attach()
    device.mount_data()
    device.mount_root("a")
    nested = device.run_dir / "slots" / "a"
    nested.mkdir(parents=True)
    subprocess.run(["mount", "-o", "ro", device.slot_device("a"), str(nested)], check=True)
    inner = device.data_dir / "sshfwup" / "tmp"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    device.unmount_all()
    assert leftovers(device.path)[0] == []


def test_slot_mount_shows_what_was_written_to_the_image_after_the_device_cached_it(device: SimDevice) -> None:
    device.attach()
    slot_b = device.slot_device("b")
    with open(slot_b, "rb") as f:
        assert f.read(4096)[:4] != b"hsqs"  # the loop device now caches slot b's empty start
    # "fwup" writes slot a's bytes into slot b through the image file, not the loop device
    offset_a, size = DEFAULT_LAYOUT.slot_span("a")
    offset_b, _ = DEFAULT_LAYOUT.slot_span("b")
    with open(device.disk, "r+b") as f:
        f.seek(offset_a)
        data = f.read(4 * 1024 * 1024)
        f.seek(offset_b)
        f.write(data)
    device.mount_root("b")
    assert (device.root_dir / "srv/app/VERSION").read_text() == "1.0.0\n"
    assert device.running_slot() == "b"


def test_read_slot_file_when_powered_off_and_on(device: SimDevice) -> None:
    assert device.read_slot_file("a", "/etc/hostname") == b"sshfwup-sim\n"
    assert leftovers(device.path) == ([], [])
    device.attach()
    loops = leftovers(device.path)[1]
    assert device.read_slot_file("a", "srv/app/VERSION") == b"1.0.0\n"
    assert leftovers(device.path) == ([], loops)
    with pytest.raises(FileNotFoundError):
        device.read_slot_file("a", "/no/such/file")
    assert leftovers(device.path) == ([], loops)
    assert list(device.run_dir.iterdir()) == []  # temporary mount points removed
    with pytest.raises(ValueError):
        device.read_slot_file("a", "/../etc/passwd")


def test_slot_bytes_sha256_matches_the_rootfs_image(device: SimDevice, firmware_v1: Path, tmp_path: Path) -> None:
    from sshfwup.firmware.archive import extract_resource

    rootfs = tmp_path / "rootfs.img"
    extract_resource(firmware_v1, "rootfs.img", rootfs)
    data = rootfs.read_bytes()
    assert device.slot_bytes_sha256("a", len(data)) == hashlib.sha256(data).hexdigest()
    assert device.slot_bytes_sha256("b", len(data)) != hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError):
        device.slot_bytes_sha256("a", DEFAULT_LAYOUT.slot_span("a")[1] + 1)


def test_env_and_set_env(device: SimDevice) -> None:
    device.set_env(nerves_fw_active="b", bootcount="2", bootlimit=None)
    env = device.env()
    assert env["nerves_fw_active"] == "b" and env["bootcount"] == "2" and "bootlimit" not in env


# --- configuration -----------------------------------------------------------------------------


def test_overrides_deep_merge_and_survive_slot_refresh(device: SimDevice) -> None:
    device.write_config(app={"strategy": "stop-first"}, server={"max_connections": 3})
    config = load_config(device.config_path)
    assert config.app.strategy == "stop-first"
    assert config.app.ready == "notify"  # the rest of [app] is kept
    assert config.server.max_connections == 3 and config.server.port == 2201

    loops = device.attach()
    device.refresh_slots()
    config = load_config(device.config_path)
    assert dict(config.device.slots) == {"a": Path(loops["a"]), "b": Path(loops["b"])}
    assert config.app.strategy == "stop-first"

    reopened = SimDevice.open(device.path)
    reopened.write_config()  # a later full rewrite keeps the remembered overrides
    assert load_config(device.config_path).server.max_connections == 3


def test_create_takes_config_overrides(device_dir: Path, firmware_v1: Path) -> None:
    device = SimDevice.create(
        device_dir, firmware=firmware_v1, ssh_port=2202, app_port=8202,
        config_overrides={"app": {"ready": "http", "drain_timeout": 1.5}},
    )
    config = load_config(device.config_path)
    assert (config.app.ready, config.app.drain_timeout) == ("http", 1.5)


def test_invalid_override_is_refused_and_the_file_kept(device: SimDevice) -> None:
    before = device.config_path.read_bytes()
    with pytest.raises(SimError, match="would be invalid"):
        device.write_config(app={"strategy": "sideways"})
    assert device.config_path.read_bytes() == before
    assert "app" not in SimDevice.open(device.path).config_overrides


def test_refresh_slots_keeps_hand_edits(device: SimDevice) -> None:
    document = tomllib.loads(device.config_path.read_text())
    document["server"]["idle_timeout"] = 42.0
    device.config_path.write_text(dumps(document))
    device.attach()
    device.refresh_slots()
    assert load_config(device.config_path).server.idle_timeout == 42.0


# --- cleanup ---------------------------------------------------------------------------------


def test_cleanup_after_a_crash_midway_kills_marked_processes(device: SimDevice) -> None:
    sleeper = None
    try:
        device.attach()
        device.mount_data()
        device.mount_root("a")
        # a process of the device, holding the root mount busy (cwd inside it)
        sleeper = subprocess.Popen(
            ["sleep", "300"], cwd=device.root_dir / "srv/app",
            env={**os.environ, MARKER_ENV: str(device.path)}, start_new_session=True,
        )
        assert marked_processes(device.path) == [sleeper.pid]
        raise RuntimeError("the test crashed here")
    except RuntimeError:
        cleanup(device.path)
        cleanup(device.path)  # twice is fine
    assert sleeper is not None and sleeper.wait(5) == -9
    assert_clean(device.path)


def test_cleanup_of_a_never_created_directory(tmp_path: Path) -> None:
    cleanup(tmp_path / "nothing-here")


def test_destroy_removes_the_directory(device: SimDevice) -> None:
    device.attach()
    device.mount_root("a")
    device.destroy()
    assert not device.path.exists()


# --- command line ------------------------------------------------------------------------------


def sim_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sshfwup.sim", *args], capture_output=True, text=True, timeout=60)


def test_cli_help() -> None:
    result = sim_cli("--help")
    assert result.returncode == 0
    for command in ("create", "run", "reboot", "power-cut", "status", "destroy"):
        assert command in result.stdout


def test_cli_create_status_destroy(device_dir: Path, firmware_v1: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "id.pub"
    key_file.write_text(KEY + "\n")
    created = sim_cli(
        "create", str(device_dir), "--firmware", str(firmware_v1), "--ssh-port", "2203", "--app-port", "8203",
        "--authorized-key", str(key_file),
    )
    assert created.returncode == 0, created.stderr
    assert load_config(device_dir / "sshfwup.toml").server.port == 2203
    # it says how to use it: the ports, and the commands of the README's hands-on section
    assert "SSH on 127.0.0.1:2203, the sample app on 127.0.0.1:8203" in created.stdout
    for line in (f"sshfwup sim run {device_dir}", "ssh -p 2203 root@127.0.0.1 status", "ssh -p 2203 root@127.0.0.1 logs -f",
                 "sshfwup upload -p 2203 root@127.0.0.1 FILE.fw --wait", "curl http://127.0.0.1:8203/"):  # fmt: skip
        assert line in created.stdout, created.stdout

    status = sim_cli("status", str(device_dir))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["machine"] is None and report["boot_env"]["a.nerves_fw_version"] == "1.0.0"

    again = sim_cli("create", str(device_dir), "--firmware", str(firmware_v1))
    assert again.returncode == 1 and "already holds a simulated device" in again.stderr

    destroyed = sim_cli("destroy", str(device_dir))
    assert destroyed.returncode == 0, destroyed.stderr
    assert not device_dir.exists()


def test_cli_help_tells_the_default_ports() -> None:
    from sshfwup.sim.cli import build_parser

    create = build_parser().parse_args(["create", "/x"])
    text = sim_cli("--help").stdout
    assert f"listens on 127.0.0.1:{create.ssh_port} and its sample app on\n127.0.0.1:{create.app_port}" in text, text
    assert (create.ssh_port, create.app_port) == (2222, 8080)


@pytest.mark.parametrize(("change", "hot"), [([], True), (["--change", "system-file"], False)])
def test_cli_firmware_builds_a_sample_to_upload(tmp_path: Path, change: list[str], hot: bool) -> None:
    from sshfwup.firmware.archive import read_firmware

    result = sim_cli("firmware", str(tmp_path / "out" / "v2.fw"), "--version", "2.0.0", *change)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(("hot reload (app only)\n" if hot else "reboot (system-file changed)\n")), result.stdout
    assert read_firmware(tmp_path / "out" / "v2.fw").version == "2.0.0"
    # only the final path is told: not the temporary one it was built at
    assert "sshfwup-sim-fw-" not in result.stdout + result.stderr, result.stdout + result.stderr
    assert (result.stdout + result.stderr).count(" built ") + (result.stdout + result.stderr).startswith("built ") == 1
    bad = sim_cli("firmware", str(tmp_path / "v2"), "--version", "2.0.0")
    assert bad.returncode == 1 and "must end in .fw" in bad.stderr
    unknown = sim_cli("firmware", str(tmp_path / "v3.fw"), "--version", "3.0.0", "--change", "bios")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_cli_create_without_firmware_builds_a_sample(device_dir: Path) -> None:
    created = sim_cli("create", str(device_dir), "--ssh-port", "2204", "--app-port", "8204")
    assert created.returncode == 0, created.stderr
    assert SimDevice.open(device_dir).read_slot_file("a", "/srv/app/VERSION") == b"1.0.0\n"


def test_cli_errors(tmp_path: Path) -> None:
    result = sim_cli("reboot", str(tmp_path))
    assert result.returncode == 1 and "no simulated machine is running" in result.stderr
    result = sim_cli("status", str(tmp_path))
    assert result.returncode == 1 and "not a simulated device" in result.stderr
    result = sim_cli("destroy", str(tmp_path))
    assert result.returncode == 1 and "refusing" in result.stderr
    assert tmp_path.exists()
    result = sim_cli("create", str(tmp_path / "d"), "--firmware", str(tmp_path / "missing.fw"))
    assert result.returncode == 1 and "not found" in result.stderr


def _host_key_pub(device: SimDevice) -> str:
    device.attach()
    device.mount_data()
    try:
        key = device.data_dir / "sshfwup" / "ssh_host_ed25519_key"
        assert key.stat().st_mode & 0o777 == 0o600
        return Path(f"{key}.pub").read_text().split()[1]
    finally:
        device.unmount_all()
        device.detach()


def test_a_device_made_again_in_the_same_directory_keeps_its_host_key(
    device_dir: Path, firmware_v1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sim destroy DIR; sim create DIR` must not make ssh cry "REMOTE HOST IDENTIFICATION HAS CHANGED"."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    first = _host_key_pub(SimDevice.create(device_dir, firmware=firmware_v1, authorized_keys=[KEY], ssh_port=2201, app_port=8201))
    SimDevice.open(device_dir).destroy()
    again = _host_key_pub(SimDevice.create(device_dir, firmware=firmware_v1, authorized_keys=[KEY], ssh_port=2201, app_port=8201))
    assert again == first
    secret = tmp_path / "state" / "sshfwup" / "sim-host-key-secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and len(secret.read_bytes()) == 32
    other_dir = tmp_path / "other"
    try:
        other = _host_key_pub(SimDevice.create(other_dir, firmware=firmware_v1, authorized_keys=[KEY], ssh_port=2202, app_port=8202))
    finally:
        cleanup(other_dir)
    assert other != first  # another directory, another key
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "another-user"))
    SimDevice.open(device_dir).destroy()
    elsewhere = _host_key_pub(SimDevice.create(device_dir, firmware=firmware_v1, authorized_keys=[KEY], ssh_port=2201, app_port=8201))
    assert elsewhere != first  # another user's (or machine's) secret, another key
