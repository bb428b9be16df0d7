"""deploy/examples/*.toml: each one runs ``sshfwup serve`` on loop devices.

Per example, the board is made of real parts: both root filesystem slots are squashfs images
(the sample firmware's tree) on loop devices, slot a is mounted read-only as the running root,
the U-Boot environment is a file read and written by fw_printenv/fw_setenv. Only what names this
machine instead of the board changes in the example — device nodes, paths, ports, the
interpreter — every other setting (readiness, sockets' names, timeouts, slot order) is the
example's own. Then ``sshfwup serve`` must come up, answer OpenSSH's ``status --json`` with the
running slot and its app, serve HTTP through the app, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import SSH_OPTIONS, KeyPair

from sshfwup.boot.bootenv import BootEnv
from sshfwup.config import parse_config
from sshfwup.sim.host import free_port
from sshfwup.sim.rootfs import make_rootfs
from sshfwup.sim.toml_write import dumps as toml_dumps

EXAMPLES = Path(__file__).resolve().parent.parent / "deploy" / "examples"
# The partitions each example's board has, as the example's header describes them.
SLOT_DEVICES = {
    "nerves-bbb.toml": {"a": "/dev/mmcblk0p2", "b": "/dev/mmcblk0p3"},
    "rootfs-first.toml": {"a": "/dev/mmcblk0p1", "b": "/dev/mmcblk0p2"},
}


def test_every_example_is_tested_and_documented() -> None:
    found = sorted(p.name for p in EXAMPLES.glob("*.toml"))
    assert found == sorted(SLOT_DEVICES)
    guide = (EXAMPLES.parent.parent / "docs" / "deploying.md").read_text()
    for name in found:
        assert f"deploy/examples/{name}" in guide, name


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout.strip()


@contextmanager
def board(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two squashfs slots on loop devices, slot a mounted as the running root, an env file."""
    tree = make_rootfs(tmp_path / "tree", version="1.0.0")
    image = tmp_path / "rootfs.squashfs"
    _run(["mksquashfs", str(tree), str(image), "-noappend", "-all-root", "-no-xattrs", "-quiet", "-no-progress"])
    loops: list[str] = []
    root = tmp_path / "root"
    root.mkdir()
    mounted = False
    try:
        for _ in ("a", "b"):
            loops.append(_run(["losetup", "--find", "--show", "--read-only", str(image)]))
        _run(["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid", loops[0], str(root)])
        mounted = True
        env_file = tmp_path / "uboot.env"
        env_file.write_bytes(bytes(0x20000))
        env_config = tmp_path / "fw_env.config"
        env_config.write_text(f"{env_file} 0x0 0x20000\n")
        # a blank env block, written by libubootenv itself (-f: start from an empty default env)
        script = "nerves_fw_active=a\nnerves_fw_validated=1\na.nerves_fw_version=1.0.0\nb.nerves_fw_version=1.0.0\n"
        subprocess.run(["fw_setenv", "-c", str(env_config), "-f", "/dev/null", "-s", "-"], input=script.encode(),
                       check=True, capture_output=True)  # fmt: skip
        assert BootEnv(env_config).read_sync()["nerves_fw_active"] == "a"  # fw_printenv reads it
        yield {"slots": {"a": loops[0], "b": loops[1]}, "root": root, "env_config": env_config}
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], capture_output=True)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def localize(example: dict[str, Any], tmp_path: Path, parts: dict[str, Any], key: KeyPair) -> dict[str, Any]:
    """The example with this machine's device nodes, paths, ports and interpreter."""
    doc = json.loads(json.dumps(example))
    data = tmp_path / "data" / "sshfwup"
    data.mkdir(parents=True)
    (data / "authorized_keys").write_text(key.public_line + "\n")
    server = doc.setdefault("server", {})
    server.update(listen="127.0.0.1", port=free_port(), host_key=str(data / "ssh_host_ed25519_key"),
                  authorized_keys=[str(data / "authorized_keys")], data_dir=str(data),
                  run_dir=str(tmp_path / "run"), lock_file=str(tmp_path / "run" / "update.lock"))  # fmt: skip
    doc.setdefault("fwup", {})["devpath"] = str(tmp_path / "disk.img")
    device = doc.setdefault("device", {})
    device.update(fw_env_config=str(parts["env_config"]), root_mount=str(parts["root"]), slots=parts["slots"],
                  reboot_command=["true"])  # fmt: skip
    app = doc["app"]
    assert app["command"][0] == "/usr/bin/python3"  # the board's interpreter: this test's here
    app["command"] = [sys.executable, *app["command"][1:]]
    # This test's interpreter and slot mount live under root-only directories (/root, pytest's
    # 0700 tmp): the app runs as the server's user here; the room itself is tested in test_room.py.
    app["user"] = ""
    name, _, address = app["sockets"][0].partition("=")
    app["sockets"] = [f"{name}=tcp:127.0.0.1:{free_port()}"]
    return doc


@pytest.mark.parametrize("name", sorted(SLOT_DEVICES))
def test_example_runs_sshfwup_serve_on_loop_devices(name: str, tmp_path: Path, client_key: KeyPair) -> None:
    example = tomllib.loads((EXAMPLES / name).read_text())
    parse_config(example, source=EXAMPLES / name)  # as written, it is a valid configuration
    assert example["device"]["slots"] == SLOT_DEVICES[name]
    with board(tmp_path) as parts:
        doc = localize(example, tmp_path, parts, client_key)
        config = tmp_path / "sshfwup.toml"
        config.write_text(toml_dumps(doc))
        port, app_port = doc["server"]["port"], int(doc["app"]["sockets"][0].rsplit(":", 1)[1])
        log = (tmp_path / "serve.log").open("w")
        server = subprocess.Popen([sys.executable, "-m", "sshfwup", "serve", "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            status = _wait_status(port, client_key, server, tmp_path / "serve.log")
            assert status["running_root"] == "a" and status["active"] == "a" and status["validated"]
            assert status["app"]["version"] == "1.0.0" and status["app"]["slot"] == "a"
            with urllib.request.urlopen(f"http://127.0.0.1:{app_port}/", timeout=5) as r:
                assert json.loads(r.read())["version"] == "1.0.0"
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                raise
            log.close()
        text = (tmp_path / "serve.log").read_text()
        assert code == 0, text
        assert "1.0.0 stopped (exited with status 0)" in text, text


def _wait_status(port: int, key: KeyPair, server: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    argv = ["ssh", *SSH_OPTIONS, "-i", str(key.private), "-p", str(port), "root@127.0.0.1", "status", "--json"]
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, log.read_text()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if result.returncode == 0:
            return json.loads(result.stdout)
        assert time.monotonic() < deadline, result.stderr + log.read_text()
        time.sleep(0.2)
