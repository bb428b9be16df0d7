"""Every SSH client a user has, against one simulated device (issue 25): a good firmware is
applied and runs; garbage is refused, the client says so (exit status / exception) and the device
is unchanged, with the reason in ``ssh DEVICE status``.

The clients are a table (:data:`CLIENTS`); README's "Clients" table is printed from it
(``scripts/clients_table.py``) and a test here checks that README shows exactly that. A client
that is not installed fails its test ("install X (scripts/bootstrap.sh does)"): a skip would
read as a pass.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import pytest
from conftest import SSH_OPTIONS, KeyPair, Sim, long_lived, output

from sshfwup.sim.fleet import SimFleet

if TYPE_CHECKING:  # imported where used: a missing paramiko fails its tests (require), not collection
    import paramiko

ROOT = Path(__file__).resolve().parents[2]
GARBAGE_REASON = "this is not a .fw file"


@dataclass(frozen=True)
class Attempt:
    """What the client told its user: did it report success, and everything it printed/raised."""

    ok: bool
    text: str


@dataclass(frozen=True)
class Device:
    """The module's device as a client sees it, plus the files each client needs to log in."""

    sim: Sim
    known_hosts: Path
    home: Path  # a throwaway HOME: PuTTY and Dropbear write their caches there, never to root's
    putty_key: Path
    dropbear_key: Path

    def host_key_fingerprint(self) -> str:
        """``SHA256:…`` of the device's host key (PuTTY's ``-hostkey``)."""
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(self.known_hosts)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return out.split()[1]

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home)}


Runner = Callable[[Device, Path], Attempt]


@dataclass(frozen=True)
class Client:
    name: str  # the test id and README's row
    command: str  # what a user types (README)
    transport: str  # how the bytes reach fwup on the device
    tool: str  # the executable that must be installed ("python" for libraries)
    run: Runner
    reports_failure: bool  # a refused upload ends in a non-zero exit status / an exception
    shows_reason: bool  # the device's reason for a refusal reaches the user
    note: str = ""  # why a client cannot report or show a refusal (README)


def _completed(result: subprocess.CompletedProcess[bytes]) -> Attempt:
    return Attempt(result.returncode == 0, output(result))


def _run(device: Device, argv: list[str], *, stdin: Path | None = None) -> Attempt:
    data = stdin.read_bytes() if stdin is not None else None
    return _completed(subprocess.run(argv, input=data, capture_output=True, timeout=120, env=device.env(),
                                     check=False))  # fmt: skip


def _openssh(device: Device, *args: str, port_flag: str = "-P") -> list[str]:
    return [*SSH_OPTIONS, "-i", str(device.sim.key.private), port_flag, str(device.sim.port), *args]


def ssh_subsystem(device: Device, fw: Path) -> Attempt:
    return _run(device, ["ssh", *_openssh(device, "-s", "root@127.0.0.1", "fwup", port_flag="-p")], stdin=fw)


def scp_sftp(device: Device, fw: Path) -> Attempt:
    return _run(device, ["scp", *_openssh(device, str(fw), "root@127.0.0.1:/fwup")])


def scp_quiet(device: Device, fw: Path) -> Attempt:
    return _run(device, ["scp", "-q", *_openssh(device, str(fw), "root@127.0.0.1:/fwup")])


def scp_legacy(device: Device, fw: Path) -> Attempt:
    return _run(device, ["scp", "-O", *_openssh(device, str(fw), "root@127.0.0.1:/fwup")])


def sftp_put(device: Device, fw: Path) -> Attempt:
    argv = ["sftp", *_openssh(device, "-b", "-", "root@127.0.0.1")]
    return _completed(subprocess.run(argv, input=f"put {fw} /fwup\n".encode(), capture_output=True, timeout=120,
                                     env=device.env(), check=False))  # fmt: skip


def _putty(device: Device) -> list[str]:
    return ["-batch", "-P", str(device.sim.port), "-i", str(device.putty_key), "-hostkey", device.host_key_fingerprint()]


def plink_subsystem(device: Device, fw: Path) -> Attempt:
    return _run(device, ["plink", "-ssh", *_putty(device), "-s", "root@127.0.0.1", "fwup"], stdin=fw)


def pscp_sftp(device: Device, fw: Path) -> Attempt:
    return _run(device, ["pscp", "-sftp", *_putty(device), str(fw), "root@127.0.0.1:/fwup"])


def pscp_scp(device: Device, fw: Path) -> Attempt:
    return _run(device, ["pscp", "-scp", *_putty(device), str(fw), "root@127.0.0.1:/fwup"])


def dbclient_subsystem(device: Device, fw: Path) -> Attempt:
    # -y: accept the host key and remember it in the throwaway HOME's ~/.ssh/known_hosts
    argv = ["dbclient", "-y", "-i", str(device.dropbear_key), "-p", str(device.sim.port), "-s", "root@127.0.0.1", "fwup"]
    return _run(device, argv, stdin=fw)


def sshfwup_upload(device: Device, fw: Path) -> Attempt:
    return _run(device, [sys.executable, "-m", "sshfwup", "upload", "root@127.0.0.1", str(fw), "-p", str(device.sim.port),
                         "-i", str(device.sim.key.private), "--known-hosts", str(device.known_hosts)])  # fmt: skip


# --- paramiko: in this process, as the scripts built on it call it ------------------------------


def _paramiko_transport(device: Device) -> paramiko.Transport:
    import base64

    import paramiko

    line = next(x for x in device.known_hosts.read_text().splitlines() if x.strip())
    _, key_type, key_b64 = line.split()[:3]
    assert key_type == "ssh-ed25519", line
    host_key = paramiko.Ed25519Key(data=base64.b64decode(key_b64))
    transport = paramiko.Transport(("127.0.0.1", device.sim.port))
    transport.connect(hostkey=host_key, username="root",
                      pkey=paramiko.Ed25519Key.from_private_key_file(str(device.sim.key.private)))  # fmt: skip
    return transport


def _paramiko_put(confirm: bool) -> Runner:
    def put(device: Device, fw: Path) -> Attempt:
        transport = _paramiko_transport(device)
        try:
            import paramiko

            sftp = paramiko.SFTPClient.from_transport(transport)
            assert sftp is not None
            attrs = sftp.put(str(fw), "/fwup", confirm=confirm)
            return Attempt(True, f"put returned: size {attrs.st_size}")
        except OSError as e:
            return Attempt(False, f"{type(e).__name__}: {e}")
        finally:
            transport.close()

    return put


def paramiko_subsystem(device: Device, fw: Path) -> Attempt:
    transport = _paramiko_transport(device)
    try:
        channel = transport.open_session()
        channel.invoke_subsystem("fwup")
        channel.sendall(fw.read_bytes())
        channel.shutdown_write()
        out = channel.makefile("rb").read() + channel.makefile_stderr("rb").read()
        status = channel.recv_exit_status()
        return Attempt(status == 0, f"exit status {status}\n{out.decode('utf-8', errors='replace')}")
    finally:
        transport.close()


CLIENTS = (
    Client("openssh-ssh-s", "ssh -s DEVICE fwup < app.fw", "fwup subsystem", "ssh", ssh_subsystem, True, True),
    Client("openssh-scp", "scp app.fw DEVICE:/fwup", "SFTP", "scp", scp_sftp, True, True),
    Client("openssh-scp-q", "scp -q app.fw DEVICE:/fwup", "SFTP", "scp", scp_quiet, True, True),
    Client("openssh-scp-O", "scp -O app.fw DEVICE:/fwup", "scp -t", "scp", scp_legacy, True, True),
    Client("openssh-sftp", "sftp -b - DEVICE <<< 'put app.fw /fwup'", "SFTP", "sftp", sftp_put, True, True),
    Client("putty-plink-s", "plink -s DEVICE fwup < app.fw", "fwup subsystem", "plink", plink_subsystem, True, True),
    Client("putty-pscp-sftp", "pscp -sftp app.fw DEVICE:/fwup", "SFTP", "pscp", pscp_sftp, True, True),
    Client("putty-pscp-scp", "pscp -scp app.fw DEVICE:/fwup", "scp -t", "pscp", pscp_scp, True, True),
    Client("dropbear-dbclient-s", "dbclient -s DEVICE fwup < app.fw", "fwup subsystem", "dbclient",
           dbclient_subsystem, True, True),  # fmt: skip
    Client("paramiko-put-confirm", "SFTPClient.put(local, '/fwup')", "SFTP", "python", _paramiko_put(True), True,
           True),  # fmt: skip
    Client("paramiko-put-noconfirm", "SFTPClient.put(local, '/fwup', confirm=False)", "SFTP", "python",
           _paramiko_put(False), False, False,
           "paramiko's close discards the device's error status"),  # fmt: skip
    Client("paramiko-subsystem", "Channel.invoke_subsystem('fwup')", "fwup subsystem", "python",
           paramiko_subsystem, True, True),  # fmt: skip
    Client("asyncssh-sshfwup-upload", "sshfwup upload DEVICE app.fw", "fwup subsystem", "python", sshfwup_upload,
           True, True),  # fmt: skip
)
# A good firmware per client: versions differ so that every upload is a real (hot) update.
VERSIONS = {client.name: f"2.{i}.0" for i, client in enumerate(CLIENTS, 1)}


def require(tool: str) -> None:
    """Fail (never skip) when a client is missing: a skipped client would read as a working one."""
    if tool == "python":
        try:
            import paramiko  # noqa: F401
        except ImportError:
            pytest.fail("install paramiko (scripts/bootstrap.sh does: it is in the test extra and the lock)")
    elif shutil.which(tool) is None:
        package = {"plink": "putty-tools", "pscp": "putty-tools", "dbclient": "dropbear-bin"}.get(tool, "openssh-client")
        pytest.fail(f"install {tool} ({package}; scripts/bootstrap.sh does)")


# --- the one device ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, firmware, client_key: KeyPair, fwup: str) -> Iterator[Device]:
    base = tmp_path_factory.mktemp("clients")
    home = base / "home"
    home.mkdir()
    putty_key, dropbear_key = base / "uploader.ppk", base / "uploader.dropbear"
    if shutil.which("puttygen"):
        subprocess.run(["puttygen", str(client_key.private), "-O", "private", "-o", str(putty_key)],
                       check=True, capture_output=True, env={**os.environ, "HOME": str(home)})  # fmt: skip
    if shutil.which("dropbearconvert"):
        subprocess.run(["dropbearconvert", "openssh", "dropbear", str(client_key.private), str(dropbear_key)],
                       check=True, capture_output=True)  # fmt: skip
    with long_lived(base), SimFleet.start(base, [firmware("1.0.0")], client_key, fwup=fwup) as fleet:
        d = fleet.devices[0]
        yield Device(Sim(d.device, d.machine, client_key), fleet.known_hosts, home, putty_key, dropbear_key)


def running_version(device: Device) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{device.sim.app_port}/", timeout=5) as r:
        return json.loads(r.read())["version"]


def wait_running(device: Device, version: str, client_said: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if running_version(device) == version:
                return
        except OSError:
            pass
        # dbclient exits 0 after "Disconnect received": the device is what tells
        assert time.monotonic() < deadline, f"the app did not come up as {version}; the client said:\n{client_said}"
        time.sleep(0.1)


def status_text(device: Device) -> str:
    result = device.sim.ssh("status")
    assert result.returncode == 0, output(result)
    return result.stdout.decode()


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_good_firmware_is_applied_and_runs(device: Device, firmware, client: Client) -> None:
    require(client.tool)
    version = VERSIONS[client.name]
    fw = firmware(version)
    attempt = client.run(device, fw)
    assert attempt.ok, f"{client.name} reported a failure:\n{attempt.text}"
    wait_running(device, version, attempt.text)
    status = device.sim.status()
    assert status["last_update"]["ok"], status
    assert version in status["last_update"]["verdict"], status
    reboot_and_validate(device)  # the next client's update needs the device on its new slot


def reboot_and_validate(device: Device) -> None:
    """A hot update leaves a reboot pending (the root filesystem runs from the old slot)."""
    machine = device.sim.machine
    state = machine.state()
    assert state is not None
    result = device.sim.ssh("reboot")
    assert result.returncode == 0, output(result)
    anyio.run(functools.partial(machine.wait_boot, state.boot_count + 1, timeout=60))
    deadline = time.monotonic() + 30
    while device.sim.env()["nerves_fw_validated"] != "1":
        assert time.monotonic() < deadline, f"the new firmware was not validated: {device.sim.env()}"
        time.sleep(0.1)


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_garbage_is_refused_and_changes_nothing(device: Device, client: Client) -> None:
    require(client.tool)
    garbage = device.home.parent / f"garbage-{client.name}.fw"
    garbage.write_bytes(os.urandom(3000))
    env_before, version_before = device.sim.env(), running_version(device)
    attempt = client.run(device, garbage)
    assert attempt.ok != client.reports_failure, (
        f"{client.name}: the table says a refusal {'is' if client.reports_failure else 'is not'} reported:\n"
        f"{attempt.text}"
    )
    assert (GARBAGE_REASON in attempt.text) == client.shows_reason, (
        f"{client.name}: the table says the device's reason is {'' if client.shows_reason else 'not '}shown:\n"
        f"{attempt.text}"
    )
    env_after = device.sim.env()
    for name in ("nerves_fw_active", "a.nerves_fw_version", "b.nerves_fw_version", "nerves_fw_validated"):
        assert env_after.get(name) == env_before.get(name), (name, env_before, env_after)
    assert running_version(device) == version_before
    # where the client cannot show it, `ssh DEVICE status` does (README says so)
    status = status_text(device)
    last = next((line for line in status.splitlines() if line.startswith("last update:")), "")
    assert "FAILED" in last and GARBAGE_REASON in last, status


# --- README's table is this table ----------------------------------------------------------------


def markdown_table() -> str:
    """README's "Clients" table: what each client does with a good firmware and with a refused one.
    Every cell is asserted by the tests above, so a green run means the table is true."""
    rows = ["| Client | Command | Transport | Good firmware | Garbage | Device's reason shown |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for c in CLIENTS:
        refused = "fails (exit status ≠ 0 / exception)" if c.reports_failure else f"**succeeds**: {c.note}"
        shown = "yes" if c.shows_reason else "no: `ssh DEVICE status` shows it"
        rows.append(f"| {c.name} | `{c.command}` | {c.transport} | applied and running | {refused} | {shown} |")
    return "\n".join(rows) + "\n"


def test_readme_shows_this_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "README's clients table is stale: paste `python scripts/clients_table.py`"
