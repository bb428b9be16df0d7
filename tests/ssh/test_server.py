"""The update path end to end: real OpenSSH clients → sshfwup → fwup → the simulated device.

These tests keep the success callback at ``report_only`` (the pipeline has its own tests), so
each one is about the transport, the lock, the limits and the refusals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import asyncssh
import pytest
from conftest import (
    B_MARKED, SSH_OPTIONS, KeyPair, Sim, assert_applied, assert_untouched, output, upload,
    wait_unlocked,
)

import sshfwup.update.update as update_module
from sshfwup.update import door
from sshfwup.update.lock import DeviceLock, LockHolder

from sshfwup.sim.host import zip_payload

from sshfwup.sim.host import ssh_keygen

APPS = Path(__file__).resolve().parents[1] / "apps"
REPORT_ONLY = {"fwup": {"success_callback": "sshfwup.update.update:report_only"}}


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return REPORT_ONLY


# --- every client applies the update ---------------------------------------------------------


async def test_ssh_subsystem(sim: Sim, firmware) -> None:
    result = sim.upload(firmware("2.0.0"))
    assert_applied(sim, result)
    assert "sshfwup: firmware 2.0.0 installed in slot b; it runs after the next reboot" in output(result)
    status = sim.status()
    assert status["pending_reboot"] and status["last_update"]["ok"]


async def test_scp_sftp_mode(sim: Sim, firmware) -> None:
    assert_applied(sim, sim.scp(firmware("2.0.0")))


async def test_scp_sftp_mode_into_directory(sim: Sim, firmware) -> None:
    assert_applied(sim, sim.scp(firmware("2.0.0"), target="/"))


async def test_scp_legacy(sim: Sim, firmware) -> None:
    assert_applied(sim, sim.scp(firmware("2.0.0"), legacy=True))


async def test_sftp_put(sim: Sim, firmware) -> None:
    result = sim.sftp(f"put {firmware('2.0.0')} /fwup\n")
    assert_applied(sim, result)


async def test_upload_client(sim: Sim, firmware) -> None:
    result = sim.run(
        [
            sys.executable, "-m", "sshfwup", "upload", "root@127.0.0.1", str(firmware("2.0.0")),
            "-p", str(sim.port), "-i", str(sim.key.private), "--insecure-accept-host-key",
        ]
    )  # fmt: skip
    text = output(result)
    assert "fwup   100%" in text and "Success!" in text, text  # its own display (tests/host/test_client.py)
    assert_applied(sim, result, bar=False)
    assert "sshfwup: firmware 2.0.0 installed in slot b" in text


# --- bad input: clear message, non-zero exit, nothing changed ----------------------------------


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("empty", "the upload is empty"),
        ("garbage", "this is not a .fw file"),
        ("half", "without the end of the .fw archive"),
        ("flipped-meta", "fwup:"),
        ("flipped-data", "fwup:"),
        ("wrong-platform", "Expecting platform="),
    ],
)
async def test_bad_firmware_is_refused(sim: Sim, firmware, case: str, expect: str) -> None:
    v2 = firmware("2.0.0").read_bytes()
    data = {
        "empty": b"",
        "garbage": os.urandom(3000),
        "half": v2[: len(v2) // 2],
        "flipped-meta": _flip(v2, 200),  # inside meta.conf
        "flipped-data": _flip(v2, len(v2) - 4096),  # inside rootfs.img
        "wrong-platform": firmware("2.0.0", platform="otherboard").read_bytes(),
    }[case]
    slot_a = sim.device.read_slot_file("a", "/srv/app/VERSION")
    result = sim.upload(data)
    text = output(result)
    assert result.returncode == 1, text
    assert expect in text, text
    assert "sshfwup: update failed:" in text, text
    # "not changed" exactly when nothing was; a slot fwup may have written stays marked, and is named
    marked = sim.env().get("b.sshfwup_state") == "incomplete"
    assert ("the device was not changed" in text) != marked, text
    assert (B_MARKED in text) == marked, text
    assert_untouched(sim, slot_a)
    assert sim.app()["version"] == "1.0.0"  # the running application never noticed
    journal = json.loads((sim.device.server_data_dir / "journal.json").read_text())
    assert journal["stage"] == "failed" and ("the device was not changed" in journal["verdict"]) != marked


async def test_over_the_size_limit(tmp_path: Path, firmware, sim: Sim) -> None:
    await sim.restart_server(server={"max_upload_size": 64 * 1024})
    v2 = firmware("2.0.0")
    result = sim.upload(v2)
    assert result.returncode == 1, output(result)
    assert "exceeds the limit of 65536 bytes" in output(result)
    legacy = sim.scp(v2, legacy=True)  # scp -O announces the size: refused before any data
    assert legacy.returncode != 0 and "over the limit of 65536 bytes" in output(legacy), output(legacy)
    assert_untouched(sim)


async def test_second_upload_is_refused_while_the_first_runs(sim: Sim, firmware) -> None:
    v2 = firmware("2.0.0").read_bytes()
    async with _client(sim) as conn:
        proc = await conn.create_process(subsystem="fwup", encoding=None)
        proc.stdin.write(v2[: len(v2) // 2])
        await proc.stdin.drain()
        await anyio.sleep(0.5)  # the first holds the lock now
        second = await anyio.to_thread.run_sync(lambda: sim.upload(v2))
        assert second.returncode == 1
        assert "the device is busy: an upload from " in output(second), output(second)
        # the lock is a real flock: an outside updater sees it too
        flock = subprocess.run(["flock", "-n", str(sim.device.run_dir / "update.lock"), "true"])
        assert flock.returncode == 1
        proc.stdin.write(v2[len(v2) // 2 :])
        proc.stdin.write_eof()
        text = (await proc.stdout.read()).decode()
        await proc.wait()
        assert proc.exit_status == 0, text
        assert "Success!" in text
    assert sim.env()["b.nerves_fw_version"] == "2.0.0"


async def test_an_outside_flock_holder_blocks_uploads(sim: Sim, firmware) -> None:
    holder = subprocess.Popen(["flock", str(sim.device.run_dir / "update.lock"), "sleep", "30"])
    try:
        await anyio.sleep(0.3)
        result = sim.upload(firmware("2.0.0"))
        assert result.returncode == 1 and "busy: an updater outside sshfwup holds" in output(result)
    finally:
        holder.kill()
        holder.wait()
    assert_untouched(sim)


async def test_an_upload_waits_for_the_devices_own_brief_work_under_the_lock(sim: Sim, firmware) -> None:
    """Boot validation holds the lock for a moment right after a boot: an upload arriving then
    is not told "another update is in progress" by the device itself; it waits and applies."""
    lock = DeviceLock(sim.device.run_dir / "update.lock")
    lock.acquire("boot validation of 1.0.0 (the test)", brief=True)
    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                results: list[subprocess.CompletedProcess[bytes]] = []
                tg.start_soon(lambda: _append(results, upload(sim, firmware("2.0.0"))))
                await anyio.sleep(1.5)
                assert not results  # still waiting for the brief holder
                lock.release()
    finally:
        lock.release()
    assert_applied(sim, results[0])


async def _append(results: list[Any], awaitable: Any) -> None:
    results.append(await awaitable)


async def test_a_brief_holder_is_waited_for_within_a_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(door, "BRIEF_HOLDER_WAIT", 0.5)
    held = DeviceLock(tmp_path / "update.lock")
    held.acquire("boot validation of 1.0.0", brief=True)
    assert DeviceLock(tmp_path / "update.lock").holder() == LockHolder(os.getpid(), "boot validation of 1.0.0",
                                                                        held.holder().since, True)  # fmt: skip
    upload_ = update_module.Update.__new__(update_module.Update)
    upload_.device = SimpleNamespace(lock=DeviceLock(tmp_path / "update.lock"), reboot_requested=None)
    upload_.uploader = "root@test"
    started = time.monotonic()
    with pytest.raises(update_module.UpdateRefused, match="busy: boot validation of 1.0.0 "), anyio.fail_after(10):
        await upload_._take_lock()
    assert 0.5 <= time.monotonic() - started < 5
    held.release()
    await upload_._take_lock()  # free: taken at once
    assert upload_.device.lock.held
    upload_.device.lock.release()


async def test_disconnects_at_any_point_change_nothing(sim: Sim, firmware) -> None:
    v2 = firmware("2.0.0").read_bytes()
    n = len(v2)
    offsets = [0, 1, 100, 1000, 4096, n // 3, n // 2, 9 * n // 10, n - 1024, n - 1]
    for i, offset in enumerate(offsets):
        if i % 2 == 0:
            # abrupt: OpenSSH client SIGKILLed (no EOF, no channel close)
            proc = subprocess.Popen(
                ["ssh", *sim._opts(None, "-p"), "-s", "root@127.0.0.1", "fwup"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            assert proc.stdin is not None
            proc.stdin.write(v2[:offset])
            proc.stdin.flush()
            await anyio.sleep(0.4)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            # polite: the channel is closed without EOF
            async with _client(sim) as conn:
                p = await conn.create_process(subsystem="fwup", encoding=None)
                p.stdin.write(v2[:offset])
                await p.stdin.drain()
                await anyio.sleep(0.4)
                p.close()
        await anyio.to_thread.run_sync(wait_unlocked, sim)
        assert_untouched(sim)
    # the server kept serving: a complete upload still works
    assert_applied(sim, sim.upload(v2))


async def test_idle_upload_times_out(sim: Sim, firmware) -> None:
    await sim.restart_server(server={"idle_timeout": 1})
    v2 = firmware("2.0.0").read_bytes()
    async with _client(sim) as conn:
        p = await conn.create_process(subsystem="fwup", encoding=None)
        p.stdin.write(v2[:1000])
        with anyio.fail_after(15):
            text = (await p.stdout.read()).decode()
            await p.wait()
    assert p.exit_status == 1 and "no data for 1 s" in text, text
    assert_untouched(sim)


async def test_precheck_callback_can_refuse(sim: Sim, firmware, tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text("def check(ctx):\n    return 'battery below 20%'\n")
    await sim.restart_server(fwup={"precheck_callback": f"{hook}:check"})
    result = sim.upload(firmware("2.0.0"))
    assert result.returncode == 1
    assert "Error: precheck refused the update: battery below 20%" in output(result)
    assert_untouched(sim)


async def test_a_custom_sync_success_callback(sim: Sim, firmware, tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    seen = tmp_path / "seen.txt"
    hook.write_text(
        "from pathlib import Path\n"
        "def done(ctx):\n"
        f"    Path({str(seen)!r}).write_text(ctx.boot.active + ' ' + ctx.boot.version(ctx.boot.active))\n"
        "    ctx.report  # the uploader's channel is available to callbacks\n"
    )
    await sim.restart_server(fwup={"success_callback": f"{hook}:done"})
    result = sim.upload(firmware("2.0.0"))
    assert result.returncode == 0, output(result)
    assert seen.read_text() == "b 2.0.0"
    assert "sshfwup: firmware 2.0.0 installed in slot b" in output(result)


async def test_a_failing_success_callback_is_reported(sim: Sim, firmware, tmp_path: Path) -> None:
    hook = tmp_path / "hook.py"
    hook.write_text("def done(ctx):\n    raise RuntimeError('disk full')\n")
    await sim.restart_server(fwup={"success_callback": f"{hook}:done"})
    result = sim.upload(firmware("2.0.0"))
    assert result.returncode == 1
    assert f"the success callback {hook}:done failed: disk full; boot env reverted to slot a" in output(result)
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1"


# --- who may connect, and what they may do ---------------------------------------------------


async def test_unknown_key_is_refused(sim: Sim, firmware, stranger_key: KeyPair) -> None:
    result = sim.upload(firmware("2.0.0"), key=stranger_key)
    assert result.returncode == 255 and "Permission denied (publickey)" in output(result)
    assert_untouched(sim)


async def test_authorized_keys_are_reread_per_connection(sim: Sim, stranger_key: KeyPair) -> None:
    assert sim.ssh("status", key=stranger_key).returncode == 255
    keys = sim.device.server_data_dir / "authorized_keys"
    keys.write_text(keys.read_text() + stranger_key.public_line + "\n")
    result = sim.ssh("status", key=stranger_key)
    assert result.returncode == 0, output(result)


async def test_password_and_keyboard_interactive_are_refused(sim: Sim) -> None:
    for method in ("password", "keyboard-interactive"):
        result = sim.ssh(
            "status",
            options=["-o", f"PreferredAuthentications={method}", "-o", "PubkeyAuthentication=no", "-v"],
        )
        assert result.returncode == 255
        assert "Authentications that can continue: publickey\r\n" in output(result) or (
            "Authentications that can continue: publickey\n" in output(result)
        ), output(result)[-2000:]


async def test_shell_exec_pty_and_forwarding_are_refused(sim: Sim) -> None:
    shell = sim.ssh()
    assert shell.returncode == 1 and "no shell here" in output(shell), output(shell)
    exe = sim.ssh("cat", "/etc/shadow")
    assert exe.returncode == 1 and "command not allowed" in output(exe), output(exe)
    pty = sim.ssh("status", options=["-tt"])
    assert "PTY allocation request failed" in output(pty), output(pty)
    local = sim.ssh(options=["-o", "ExitOnForwardFailure=yes", "-W", "127.0.0.1:22"])
    assert local.returncode == 255 and "forwarding failed" in output(local), output(local)
    # what the user reads (ssh prints it at its default log level): not allowed, not "Connection refused"
    options = [o for pair in zip(SSH_OPTIONS[::2], SSH_OPTIONS[1::2]) if pair[1] != "LogLevel=ERROR" for o in pair]
    argv = ["ssh", *options, "-o", "LogLevel=INFO", "-i", str(sim.key.private),
            "-p", str(sim.port), "-o", "ExitOnForwardFailure=yes", "-W", "127.0.0.1:22", f"root@{sim.host}"]  # fmt: skip
    told = output(sim.run(argv))
    assert "open failed: administratively prohibited: port forwarding is not allowed on this device" in told, told
    assert "Connection refused" not in told
    remote = sim.ssh(
        "status", options=["-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:0:127.0.0.1:22"]
    )
    assert remote.returncode == 255 and "forwarding failed" in output(remote), output(remote)
    agent = sim.ssh("status", options=["-A", "-o", "ForwardX11=yes"])
    assert agent.returncode == 0  # requested, silently not granted: the command itself still runs


@pytest.mark.parametrize(
    "batch",
    ["ls /", "get /fwup {tmp}/x", "rm /fwup", "mkdir /x", "rename /a.fw /b.fw", "put {fw} ../escape.fw",
     "put {fw} /etc/passwd", "put {fw} /sub/dir.fw", "ls ..", "symlink /fwup /x.fw", "chmod 777 /fwup"],
)  # fmt: skip
async def test_sftp_refuses_everything_but_uploads(sim: Sim, firmware, batch: str, tmp_path: Path) -> None:
    result = sim.sftp(batch.format(fw=firmware("2.0.0"), tmp=tmp_path) + "\n")
    assert result.returncode != 0, output(result)
    text = output(result)
    assert any(
        s in text for s in ("only accepts firmware uploads", "not allowed", "not found", "No such file", "Permission denied")
    ), text
    assert_untouched(sim)
    assert not (tmp_path / "x").exists()


# --- authorized_keys options, as sshd reads them (table: docs/security.md) -------------------


async def test_authorized_keys_options_through_openssh(sim: Sim, firmware, tmp_path: Path) -> None:
    names = ("status_only", "expired", "upload_only", "elsewhere", "unknown_option", "until_2999")
    k = {name: ssh_keygen(tmp_path / name) for name in names}
    _authorize(
        sim,
        f'command="status",restrict {k["status_only"].public_line}',
        f'expiry-time="20000101" {k["expired"].public_line}',
        f'command="fwup" {k["upload_only"].public_line}',
        f'from="10.0.0.0/8" {k["elsewhere"].public_line}',
        f'no-such-option {k["unknown_option"].public_line}',
        f'expiry-time="29991231" {k["until_2999"].public_line}',
    )
    v2 = firmware("2.0.0")
    only = k["status_only"]
    shell = sim.ssh(key=only)  # a shell request runs the forced command, as in sshd
    assert shell.returncode == 0 and "running root:" in output(shell), output(shell)
    assert sim.ssh("status", key=only).returncode == 0
    for refused in (sim.ssh("reboot", key=only), sim.ssh("status", "--json", key=only), sim.upload(v2, key=only)):
        assert refused.returncode == 1 and "this key may only run `status`" in output(refused), output(refused)
    for refused in (sim.scp(v2, key=only), sim.scp(v2, legacy=True, key=only), sim.sftp(f"put {v2} /fwup\n", key=only)):
        assert refused.returncode != 0 and "this key may only run `status`" in output(refused), output(refused)
    assert_untouched(sim)
    for name in ("expired", "elsewhere", "unknown_option"):
        denied = sim.ssh("status", key=k[name])
        assert denied.returncode == 255 and "Permission denied (publickey)" in output(denied), (name, output(denied))
    assert sim.ssh("status", key=k["until_2999"]).returncode == 0
    upload_key = k["upload_only"]
    status = sim.ssh("status", key=upload_key)
    assert status.returncode == 1 and "this key may only upload firmware" in output(status), output(status)
    assert_applied(sim, sim.upload(v2, key=upload_key))
    log = sim.machine.log_path.read_text()
    assert "expired at 2000-01-01" in log and "option 'no-such-option' is unknown" in log
    assert "restricted to `status`" in log


async def test_user_certificates_with_principals(sim: Sim, firmware, tmp_path: Path) -> None:
    ca = ssh_keygen(tmp_path / "ca")
    _authorize(sim, f'cert-authority,principals="alice,ops-*" {ca.public_line}')

    def certified(name: str, *options: str) -> KeyPair:
        user = ssh_keygen(tmp_path / name)
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca.private), "-I", name, *options, str(user.public)], check=True)
        assert Path(f"{user.private}-cert.pub").exists()  # ssh loads it next to the key
        return user

    alice = certified("alice", "-n", "alice", "-V", "-5m:+1h")
    ok = sim.ssh("status", key=alice)
    assert ok.returncode == 0, output(ok)
    assert sim.ssh("status", key=certified("ops", "-n", "ops-7")).returncode == 0
    for name, options in [("bob", ("-n", "bob")), ("old", ("-n", "alice", "-V", "20000101:20000102"))]:
        denied = sim.ssh("status", key=certified(name, *options))
        assert denied.returncode == 255 and "Permission denied" in output(denied), (name, output(denied))
    # a certificate's force-command keeps sshd's meaning: it runs instead of what was asked
    forced = certified("forced", "-n", "alice", "-O", "force-command=status")
    for asked in (sim.upload(firmware("2.0.0"), key=forced), sim.ssh("reboot", key=forced), sim.ssh(key=forced)):
        assert asked.returncode == 0 and "running root:" in output(asked), output(asked)
    assert_untouched(sim)
    # a certificate's force-command and the CA line's command= must agree, as in sshd
    _authorize(sim, f'cert-authority,principals="alice",command="reboot" {ca.public_line}', replace=True)
    conflict = sim.ssh("status", key=forced)
    assert conflict.returncode == 255 and "certificate and key options conflict" in output(conflict), output(conflict)
    log = sim.machine.log_path.read_text()
    assert "accepted certificate for alice signed by CA" in log


def _authorize(sim: Sim, *lines: str, replace: bool = False) -> None:
    path = sim.device.server_data_dir / "authorized_keys"
    kept = "" if replace else path.read_text()
    path.write_text(kept + "".join(f"{line}\n" for line in lines))


# --- limits before and after login --------------------------------------------------------------


def _hold(port: int, source: str, count: int, *, hello: bytes | None = None) -> list[socket.socket]:
    """``count`` TCP connections from ``source`` (an address on the loopback network) that
    send nothing (or only ``hello``) and stay open."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", port))
            if hello is not None:
                s.sendall(hello)
        except OSError:
            s.close()
            continue
        held.append(s)
    return held


def _still_open(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has not closed (it sent its version line to those)."""
    alive = 0
    for s in sockets:
        try:
            s.settimeout(0.2)
            data = s.recv(4096, socket.MSG_PEEK)
        except (socket.timeout, BlockingIOError):
            continue  # nothing yet: not closed either... but the server talks first when it admits
        except OSError:
            continue
        alive += data.startswith(b"SSH-2.0-")
    return alive


async def test_logins_succeed_while_silent_and_slow_connections_are_held(sim: Sim) -> None:
    """50 silent TCP connections from one address, 20 slow handshakes from another, 50 silent
    connections from 50 addresses: real OpenSSH logins still get in, every time."""
    held: list[socket.socket] = []
    try:
        one = _hold(sim.port, "127.0.0.2", 50)
        slow = _hold(sim.port, "127.0.0.3", 20, hello=b"SSH-2.0-slowloris\r\n\x00\x00")  # half a packet
        many = [s for i in range(50) for s in _hold(sim.port, f"127.0.1.{i + 1}", 1)]
        held = one + slow + many
        await anyio.sleep(1.5)  # the floods have been silent past the grace
        results = [await anyio.to_thread.run_sync(lambda: sim.ssh("status")) for _ in range(10)]
        kept_one, kept_slow, kept_many = _still_open(one), _still_open(slow), _still_open(many)
    finally:
        for s in held:
            s.close()
    assert [r.returncode for r in results] == [0] * 10, [output(r) for r in results if r.returncode]
    assert kept_one <= 3 and kept_slow <= 3, (kept_one, kept_slow)  # max_startups_per_source
    log = sim.machine.log_path.read_text()
    assert "unauthenticated connections from 127.0.0.2 already (max_startups_per_source)" in log
    assert "silent, and a new connection needed its place" in log
    print(f"held open by the server: {kept_one}/50 from one address, {kept_slow}/20 slow, {kept_many}/50 from 50 addresses")


async def test_connections_that_run_nothing_are_closed(sim: Sim, firmware) -> None:
    await sim.restart_server(server={"session_idle_timeout": 1})
    started = time.monotonic()
    idle = sim.ssh("-N", timeout=30)  # logged in, asks for nothing
    assert idle.returncode == 255 and "idle for 1 s" in output(idle), output(idle)
    assert time.monotonic() - started < 15
    async with _client(sim) as conn:
        sftp = await conn.start_sftp_client()
        assert await sftp.realpath(".") == "/"
        with anyio.fail_after(15):
            await conn.wait_closed()  # an SFTP session that does nothing
    assert_applied(sim, sim.upload(firmware("2.0.0")))  # a session that works is never cut


async def test_client_names_cannot_forge_log_lines(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> None:
    forged = "INFO sshfwup.ssh.server: accepted key SHA256:forged"
    async with _client(sim) as conn:
        sftp = await conn.start_sftp_client()
        try:
            f = await sftp.open(f"/x\n{forged}.fw", "wb")
            await f.close()
        except asyncssh.SFTPError:
            pass
    # OpenSSH's client refuses such a user name; an attacker's client need not
    monkeypatch.setattr(asyncssh.connection, "saslprep", lambda name: name)
    with pytest.raises((asyncssh.Error, OSError)):
        async with asyncssh.connect(
            "127.0.0.1", sim.port, username=f"root\n{forged}", client_keys=[str(sim.key.private)], known_hosts=None
        ):
            pass
    await anyio.sleep(0.5)
    lines = sim.machine.log_path.read_text().splitlines()
    assert not any(line.startswith("INFO sshfwup.ssh.server: accepted key SHA256:forged") for line in lines)
    assert any("/x\\x0aINFO sshfwup.ssh.server" in line for line in lines), "the name was logged, escaped"


async def test_too_many_connections(sim: Sim) -> None:
    await sim.restart_server(server={"max_connections": 2})
    async with _client(sim), _client(sim):
        result = sim.ssh("status")
        assert result.returncode == 255 and "too many connections" in output(result), output(result)
    assert sim.ssh("status").returncode == 0


async def test_login_timeout(sim: Sim) -> None:
    await sim.restart_server(server={"login_timeout": 1})
    with socket.create_connection(("127.0.0.1", sim.port), timeout=10) as s:
        assert s.recv(100).startswith(b"SSH-2.0-")
        start = time.monotonic()
        while s.recv(4096):
            pass
        assert time.monotonic() - start < 8  # the server hung up on a silent client


async def test_host_key_is_private_and_stable(sim: Sim) -> None:
    key = sim.device.server_data_dir / "ssh_host_ed25519_key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    fp1 = subprocess.run(["ssh-keygen", "-lf", str(key)], capture_output=True, text=True).stdout
    await sim.restart_server()
    fp2 = subprocess.run(["ssh-keygen", "-lf", str(key)], capture_output=True, text=True).stdout
    assert fp1 == fp2 and "ED25519" in fp1


# --- memory stays bounded whatever the image size -------------------------------------------


async def test_server_memory_is_bounded_with_a_slow_fwup(sim: Sim, tmp_path: Path) -> None:
    sink = tmp_path / "fwup"
    sink.write_text(f"#!/bin/sh\nexec {sys.executable} {APPS / 'sink_fwup.py'} --rate 40 \"$@\"\n")
    sink.chmod(0o755)
    await sim.restart_server(fwup={"path": str(sink), "success_callback": ""})
    pid = sim.machine.state().server_pid
    size = 160 * 1024 * 1024
    blob = zip_payload(tmp_path / "big.fw", size)
    with open(blob, "rb") as f:
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                ["ssh", *sim._opts(None, "-p"), "-s", "root@127.0.0.1", "fwup"], stdin=f, capture_output=True
            )
        )
    assert result.returncode == 0, output(result)
    hwm = _vm_hwm(pid)
    assert hwm < 100 * 1024 * 1024, f"server peak RSS {hwm / 2**20:.0f} MiB for a {size >> 20} MiB upload"


# --- helpers -------------------------------------------------------------------------------


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _client(sim: Sim) -> Any:
    return asyncssh.connect(
        "127.0.0.1", sim.port, username="root", client_keys=[str(sim.key.private)], known_hosts=None
    )
