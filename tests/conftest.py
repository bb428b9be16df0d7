"""Shared fixtures: keys, sample firmware, a running simulated device, OpenSSH client helpers.

Every test runs against the real fwup on PATH (>= 1.16; ``scripts/bootstrap.sh`` builds it from
``FWUP_SOURCE``); the header line of a run names it. ``pytest -m fwup`` selects the tests that
apply firmware with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from sshfwup.sim.device import SimDevice, cleanup
from sshfwup.sim.host import KeyPair, free_port, ssh_keygen
from sshfwup.sim.machine import SimMachine
from sshfwup.sim.rootfs import build_sample_firmware

SAMPLES = Path(__file__).resolve().parent / "data" / "fwup-1.16"


FWUP_MIN = (1, 16)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-vm", action="store_true", help="also run tests marked vm (boots QEMU; tests/vm)")
    parser.addoption("--vm-cuts", type=int, default=int(os.environ.get("SSHFWUP_VM_CUTS") or 10),
                     help="power cuts at random points in the vm tier (default 10; SSHFWUP_VM_CUTS)")  # fmt: skip


def _fwup() -> tuple[str | None, str]:
    path = shutil.which("fwup")
    if path is None:
        return None, "no fwup on PATH"
    result = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path, result.stdout.strip() or "unknown version"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the simulated devices of killed earlier runs (their owner is gone), saying what went;
    devices of live runs — other sessions, demos, ``sim run`` — are left alone."""
    import os

    if os.geteuid() != 0:  # no loop devices or mounts of ours could exist
        return
    from sshfwup.sim.device import SimError
    from sshfwup.sim.stale import remove_stale

    try:
        report = remove_stale()
        lines = [*report.removed, *(f"could not remove: {p}" for p in report.problems)]
    except SimError as e:  # (no losetup): the tests that need one say so themselves
        lines = [f"could not look for stale simulated devices: {e}"]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in lines:
        if reporter is not None:
            reporter.write_line(f"sshfwup: {line}")


def pytest_report_header(config: pytest.Config) -> str:
    path, version = _fwup()
    return f"fwup {version} at {path}" if path else "fwup: none on PATH (the tests that need it fail)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "fwup" in getattr(item, "fixturenames", ()) or "sim" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fwup)
        if item.get_closest_marker("slow") and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
        if item.get_closest_marker("vm") and not config.getoption("--run-vm"):
            item.add_marker(pytest.mark.skip(reason="vm: boots QEMU (minutes, root); run with --run-vm"))


# --- fwup ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fwup() -> str:
    """The real fwup on PATH; a test that needs it fails (never skips) without one."""
    path, version = _fwup()
    if path is None:
        pytest.fail("fwup not found on PATH: run ./scripts/bootstrap.sh (it builds fwup from FWUP_SOURCE)")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < FWUP_MIN:
        pytest.fail(f"fwup {version} at {path} is older than {'.'.join(map(str, FWUP_MIN))}")
    return path


# --- keys --------------------------------------------------------------------------------


def _keygen(path: Path) -> KeyPair:
    return ssh_keygen(path)


@pytest.fixture(scope="session")
def firmware_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two fwup signing key pairs: ``ours`` and ``theirs`` (private key paths), ``ours.pub`` and
    ``theirs.pub`` (public)."""
    from sshfwup.firmware.keys import generate_keypair

    out = tmp_path_factory.mktemp("signing")
    paths: dict[str, Path] = {}
    for name in ("ours", "theirs"):
        priv, pub = generate_keypair()
        (out / f"{name}.priv").write_text(priv)
        (out / f"{name}.pub").write_text(pub)
        paths[name], paths[f"{name}.pub"] = out / f"{name}.priv", out / f"{name}.pub"
    return paths


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return _keygen(tmp_path_factory.mktemp("keys") / "uploader")


@pytest.fixture(scope="session")
def stranger_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return _keygen(tmp_path_factory.mktemp("keys") / "stranger")


# --- firmware ------------------------------------------------------------------------------


FirmwareFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def firmware(tmp_path_factory: pytest.TempPathFactory, fwup: str) -> FirmwareFactory:
    """``firmware("2.0.0", hot=True, changes=("kernel",))`` → a cached .fw for the simulator."""
    root = tmp_path_factory.mktemp("firmware")
    cache: dict[str, Path] = {}

    def make(version: str, **kwargs: Any) -> Path:
        key = json.dumps([version, kwargs], sort_keys=True, default=str)
        if key not in cache:
            name = f"fw{len(cache)}-{version}"
            cache[key] = build_sample_firmware(root / name, version=version, name=name, **kwargs)
        return cache[key]

    return make


# --- the simulated device -----------------------------------------------------------------


SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "IdentitiesOnly=yes",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
)  # fmt: skip


@dataclass
class Sim:
    device: SimDevice
    machine: SimMachine
    key: KeyPair
    host: str = "127.0.0.1"
    user: str = "root"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.device.ssh_port

    @property
    def app_port(self) -> int:
        return self.device.app_port

    def _opts(self, key: KeyPair | None, port_flag: str) -> list[str]:
        return [*SSH_OPTIONS, "-i", str((key or self.key).private), port_flag, str(self.port)]

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout, check=False)

    def ssh(self, *args: str, key: KeyPair | None = None, input: bytes | None = None, options: Sequence[str] = (), timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return self.run(["ssh", *self._opts(key, "-p"), *options, f"{self.user}@{self.host}", *args], input=input, timeout=timeout)

    def upload(self, fw: Path | bytes, *, key: KeyPair | None = None, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """``cat fw | ssh -s HOST fwup`` — exactly what Nerves' upload.sh does."""
        data = fw if isinstance(fw, bytes) else fw.read_bytes()
        return self.run(["ssh", *self._opts(key, "-p"), "-s", f"{self.user}@{self.host}", "fwup"], input=data, timeout=timeout)

    def scp(self, fw: Path, target: str = "/fwup", *, legacy: bool = False, key: KeyPair | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.run(["scp", *(["-O"] if legacy else []), *self._opts(key, "-P"), str(fw), f"{self.user}@{self.host}:{target}"])

    def sftp(self, batch: str, *, key: KeyPair | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.run(["sftp", *self._opts(key, "-P"), "-b", "-", f"{self.user}@{self.host}"], input=batch.encode())

    def status(self) -> dict[str, Any]:
        result = self.ssh("status", "--json")
        assert result.returncode == 0, result.stderr.decode()
        return json.loads(result.stdout)

    def env(self) -> dict[str, str]:
        return self.device.env()

    async def restart_server(self, **config: Any) -> None:
        """Apply a config change the way an operator would: write it, restart the service."""
        if config:
            self.device.write_config(**config)
        before = self.machine.state()
        assert before is not None
        self.machine.kill_server()
        await self.machine.wait_state(
            lambda s: s.server_restarts > before.server_restarts and s.ready and s.server_pid != before.server_pid,
            timeout=30,
        )

    def app(self, path: str = "/", timeout: float = 5) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.app_port}{path}", timeout=timeout) as r:
            return json.loads(r.read())


def output(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode("utf-8", errors="replace")


# --- what a test checks on a device after an upload -------------------------------------------


def assert_untouched(sim: Sim, slot_a: bytes | None = None) -> None:
    """The device is exactly as before: slot a active and validated, slot b empty, a intact."""
    env = sim.env()
    assert env["nerves_fw_active"] == "a", env
    assert env["nerves_fw_validated"] == "1", env
    assert "b.nerves_fw_version" not in env or env["b.nerves_fw_version"] in ("",), env
    if slot_a is not None:
        assert sim.device.read_slot_file("a", "/srv/app/VERSION") == slot_a


def assert_applied(
    sim: Sim, result: subprocess.CompletedProcess[bytes], version: str = "2.0.0", *, bar: bool = True
) -> None:
    text = output(result)
    assert result.returncode == 0, text
    assert "Success!" in text and ("100% [" in text or not bar), text
    env = sim.env()
    assert env["nerves_fw_active"] == "b"
    assert env["b.nerves_fw_version"] == version
    assert env["nerves_fw_validated"] == "0"
    assert "b.sshfwup_state" not in env  # fwup's on-finish dropped the "incomplete" mark with the switch
    # slot b really holds the new squashfs: mount it and read a file
    assert sim.device.read_slot_file("b", "/srv/app/VERSION").decode().strip() == version


#: what the device says of the factory's empty slot b once fwup may have written it (the rest of
#: the words name it: "slot b (which held no firmware) was partly written and ")
B_MARKED = "is marked incomplete: nothing boots it until a new upload completes; slot a (1.0.0) still runs and boots next"


def env_block(sim: Sim) -> bytes:
    """The U-Boot environment block itself, as fw_env.config locates it in the disk image."""
    path, offset, size = (sim.device.path / "fw_env.config").read_text().split()[:3]
    with open(path, "rb") as f:
        f.seek(int(offset, 0))
        return f.read(int(size, 0))


def slot_sha256(sim: Sim, slot: str) -> str:
    return sim.device.slot_bytes_sha256(slot, sim.device.layout.slot_span(slot)[1])


async def other_slot_whole(sim: Sim, firmware: FirmwareFactory) -> None:
    """Slot b holds a whole 2.0.0 and slot a (1.0.0) runs validated: 2.0.0 hot-swapped in, then reverted."""
    result = await upload(sim, firmware("2.0.0"))
    assert result.returncode == 0, output(result)
    result = sim.ssh("revert")
    assert result.returncode == 0, output(result)
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1", env
    assert env["b.nerves_fw_version"] == "2.0.0" and "b.sshfwup_state" not in env, env


def wait_unlocked(sim: Sim, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while sim.status()["update_in_progress"]:
        assert time.monotonic() < deadline, "the update lock stayed held"
        time.sleep(0.05)


async def upload(sim: Sim, fw: Path | bytes) -> subprocess.CompletedProcess[bytes]:
    """``sim.upload`` off the event loop (the device's server runs in another process)."""
    return await anyio.to_thread.run_sync(lambda: sim.upload(fw))


def journal(sim: Sim) -> dict[str, Any]:
    """The device's update journal, as the server last wrote it."""
    return json.loads((sim.device.server_data_dir / "journal.json").read_text())


async def wait_until(predicate: Any, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (OSError, ValueError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.1)


@pytest.fixture
def sim_config() -> dict[str, Any]:
    """Override per test: ``@pytest.mark.parametrize`` or a local fixture returning config overrides."""
    return {}


@pytest.fixture
def sim_firmware() -> dict[str, Any]:
    """Override per test: how the factory firmware 1.0.0 is built (``make_rootfs`` arguments,
    e.g. ``{"app_behavior": {"fail_at_start": "..."}}``)."""
    return {}


@pytest.fixture
async def sim(
    tmp_path: Path, firmware: FirmwareFactory, client_key: KeyPair, fwup: str, sim_config: dict[str, Any],
    sim_firmware: dict[str, Any],
) -> AsyncIterator[Sim]:
    """A running simulated device with firmware 1.0.0 in slot a and its app serving."""
    path = tmp_path / "device"
    try:
        device = SimDevice.create(
            path,
            firmware=firmware("1.0.0", **sim_firmware),
            fwup=fwup,
            authorized_keys=[client_key.public_line],
            ssh_port=free_port(),
            app_port=free_port(),
            config_overrides=sim_config,
        )
        async with SimMachine.start(device.path) as machine:
            await machine.wait_up(timeout=60)
            yield Sim(device, machine, client_key)
    finally:
        cleanup(path)


_LONG_LIVED: set[str] = set()  # directories of devices that outlive a test (module-scoped fleets)


@contextmanager
def long_lived(path: Path) -> Iterator[None]:
    """Devices under ``path`` outlive single tests (a module-scoped fleet): the per-test check
    leaves them alone; when the block ends, nothing under ``path`` may be left."""
    key = f"{path.resolve()}/"
    _LONG_LIVED.add(key)
    try:
        yield
    finally:
        _LONG_LIVED.discard(key)
    leaks = sorted(item for item in _loops_and_mounts() if key in item)
    assert not leaks, f"left behind: {leaks}"


@pytest.fixture(autouse=True)
def _nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test must clean up the mounts and loop devices it made, even when it fails."""
    yield
    base = f"{tmp_path_factory.getbasetemp().resolve()}/"  # the slash: pytest-9 is not pytest-94
    leaks = sorted(item for item in _loops_and_mounts() if base in item and not any(d in item for d in _LONG_LIVED))
    if leaks:
        for item in leaks:  # don't let one test's leak fail every later one
            subprocess.run(["umount", "-l", item.split(" ", 2)[2]] if item.startswith("mount") else
                           ["losetup", "-d", item.split(" ")[1]], capture_output=True)
        pytest.fail(f"the test left behind: {leaks}")


def _loops_and_mounts() -> set[str]:
    out = subprocess.run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True).stdout
    items = set()
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            items.add(f"loop {parts[0]} {parts[1].strip()}")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        items.add(f"mount at {line.split()[4]}")
    return items


# --- supervised apps ---------------------------------------------------------------------------


@pytest.fixture
def marker() -> Iterator[str]:
    """A supervisor marker of our own; afterwards nothing carrying it may be left running."""
    import os
    import signal
    import uuid

    from sshfwup.supervisor.supervisor import marked_processes

    value = f"sshfwup-test-{uuid.uuid4().hex[:12]}"
    yield value
    leftovers = marked_processes(value)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left running: {leftovers}"
