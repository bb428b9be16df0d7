"""``sshfwup upload``: parsing the device's text, the display (plain and bars), ``--wait`` after a
hot swap, a reboot and a fallback, and the messages of a first hour (host key, -i, a directory)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Sim, wait_unlocked, wait_until

from sshfwup.host.client import OutputParser, ParsedLine, RebootWatch, _firmware_version, clean_text, judge_reboot
from sshfwup.host.progress_display import BarDisplay, PlainDisplay, make_display

FAST = {"app": {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}}
ESCAPE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


# --- the device's text -----------------------------------------------------------------------


def parse(*chunks: str) -> list[ParsedLine]:
    parser = OutputParser()
    out: list[ParsedLine] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out + parser.flush()


def test_the_finished_bar_is_progress_not_a_message() -> None:
    # What sshfwup's and fwup's text renderer send around Success!
    items = parse("\r 99% [=================================== ]", "\r100% [====================================]\nSuccess!\n")
    assert items == [ParsedLine(percent=99), ParsedLine(percent=100), ParsedLine(text="Success!")]


def test_a_message_that_clears_an_unfinished_bar() -> None:
    items = parse("\r  0% [                                    ]\r\x1b[Kfwup: Upgrading partition B\n")
    assert items == [ParsedLine(percent=0), ParsedLine(text="fwup: Upgrading partition B")]


def test_bars_split_across_chunks() -> None:
    items = parse("\r 25% [=====", "====                           ]\r 50% [", "==================                  ]")
    assert [i.percent for i in items] == [25, 50]


def test_escape_sequences_and_controls_from_the_device_are_removed() -> None:
    items = parse("\x1b]0;pwned\x07evil \x1b[31mred\x1b[0m \x9b2Jtext\x08\n")
    (item,) = items
    assert item.text is not None and not ESCAPE.search(item.text) and "\x9b" not in item.text
    assert "red" in item.text and "\x1b" not in item.text
    assert clean_text("a\tb") == "a\tb"


def test_an_unterminated_last_line_is_shown() -> None:
    assert parse("Error: a reboot is pending") == [ParsedLine(text="Error: a reboot is pending")]


# --- the display ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_display_text() -> None:
    out = io.StringIO()
    clock = Clock()
    d = PlainDisplay(out, clock=clock)
    d.start(4_000_000)
    for _ in range(8):
        d.sent(500_000)
        clock.now += 0.25
        d.fwup(min(100, (d.transfer.done * 100) // 4_000_000 - 3))
    d.sent_all()
    clock.now += 5  # the rate must not fall once the transfer is over
    d.line("fwup: Upgrading partition B")
    d.fwup(100)
    d.line("Success!")
    d.close()
    assert out.getvalue() == (
        "upload  25%  1.0 MB of 4.0 MB, 4.0 MB/s\n"  # 1 MB in the 0.25 s since the first byte
        "fwup    34%\n"
        "upload  50%  2.0 MB of 4.0 MB, 2.7 MB/s\n"
        "fwup    59%\n"
        "upload  75%  3.0 MB of 4.0 MB, 2.4 MB/s\n"
        "fwup    84%\n"
        "upload 100%  4.0 MB in 2.0 s, 2.0 MB/s\n"  # and no later figure: the rate stops with the transfer
        "fwup: Upgrading partition B\n"
        "fwup   100%\n"
        "Success!\n"
    ), out.getvalue()


def test_upload_100_only_once_the_device_takes_the_data() -> None:
    """Everything sent is not everything taken: a device that refuses after the head has had the
    whole small file put into its SSH window. 100 % is said once fwup writes, or the device succeeds."""
    refused, taken, succeeded = io.StringIO(), io.StringIO(), io.StringIO()
    for out in (refused, taken, succeeded):
        d = PlainDisplay(out, clock=Clock())
        d.start(1000)
        d.sent(1000)
        d.sent_all()
        d.fwup(0)
        if out is taken:
            d.fwup(30)
        elif out is succeeded:
            d.accepted()  # (a device that shows no progress)
        d.line("the device's verdict")
        d.close()
    assert refused.getvalue() == "the device's verdict\n", refused.getvalue()
    assert taken.getvalue().startswith("upload 100%  1.0 KB in 0.0 s"), taken.getvalue()
    assert taken.getvalue().splitlines()[1:] == ["fwup    30%", "the device's verdict"], taken.getvalue()
    assert succeeded.getvalue().startswith("upload 100%  1.0 KB in 0.0 s"), succeeded.getvalue()


def test_a_refused_transfer_bar_does_not_say_100() -> None:
    out = Tty()
    d = BarDisplay(out, clock=Clock())
    d.start(1000)
    d.sent(1000)
    d.sent_all()
    d.fwup(0)
    d.close()
    assert "upload sent|" in out.getvalue() and "the device did not take it all" in out.getvalue(), repr(out.getvalue())


def test_quiet_plain_display_has_lines_only() -> None:
    out = io.StringIO()
    d = PlainDisplay(out, quiet=True)
    d.start(10)
    d.sent(10)
    d.sent_all()
    d.fwup(100)
    d.line("sshfwup: hot reload: …")
    assert out.getvalue() == "sshfwup: hot reload: …\n"


def test_not_a_terminal_means_plain_lines() -> None:
    assert isinstance(make_display(io.StringIO()), PlainDisplay)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("columns", "env", "bars"),
    [(120, None, True), (0, None, False), (0, "0", False), (0, "100", True), (30, None, False), (30, "100", False)],
    ids=["wide", "zero-width", "zero-width-COLUMNS=0", "zero-width-COLUMNS=100", "narrow", "narrow-COLUMNS-ignored"],
)
def test_a_terminal_without_room_for_bars_gets_plain_lines(
    monkeypatch: pytest.MonkeyPatch, columns: int, env: str | None, bars: bool
) -> None:
    """A terminal that reports 0 columns (or too few) would show bars cut down to blanks."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    if env is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", env)
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        with open(slave, "w", closefd=False) as stream:
            display = make_display(stream)
            assert isinstance(display, BarDisplay if bars else PlainDisplay), (columns, env)
            if not bars:
                display.start(1000)
                display.sent(1000)
                display.sent_all()
                display.fwup(100)
                stream.flush()
                out = ""
                while "fwup   100%" not in out and select.select([master], [], [], 5)[0]:
                    out += os.read(master, 65536).decode()
                assert "upload 100%  1.0 KB in" in out and "fwup   100%" in out, out
    finally:
        os.close(master)
        os.close(slave)


def test_bars_on_a_terminal_freeze_the_rate_and_reach_100(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # (a StringIO has no terminal to ask)
    out = Tty()
    clock = Clock()
    d = make_display(out)
    assert isinstance(d, BarDisplay)
    d = BarDisplay(out, clock=clock)
    d.start(2_000_000)
    d.sent(1_000_000)
    clock.now += 1
    d.sent(1_000_000)
    d.sent_all()
    d.line("fwup: Upgrading partition B")
    for p in (30, 99, 100):
        d.fwup(p)
    d.line("Success!")
    d.close()
    screen = out.getvalue()
    assert "upload 100%" in screen and "2.00MB in 1.0 s, 2.0 MB/s" in screen, screen
    assert re.search(r"fwup +100%", screen), screen
    # lines after the bars are finished are plain lines below them
    assert screen.rstrip().endswith("Success!"), screen
    assert screen.count("fwup: Upgrading partition B") == 1


# --- deciding what a reboot did ---------------------------------------------------------------


def status(running: str, active: str, validated: bool, versions: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "running_root": running,
        "active": active,
        "validated": validated,
        "pending_reboot": running != active,
        "slots": {s: {"version": v} for s, v in versions.items()},
        "server": {"instance": extra.pop("instance", "new")},
        **extra,
    }


def test_judging_a_reboot() -> None:
    watch = RebootWatch("3.0.0", "b", "old")
    both = {"a": "1.0.0", "b": "3.0.0"}
    assert judge_reboot(status("a", "b", False, both, instance="old"), watch) == (None, "")  # not gone yet
    assert judge_reboot(status("a", "b", False, both), watch)[0] is None  # restarted, reboot still pending
    verdict, text = judge_reboot(status("b", "b", False, both), watch)
    assert verdict is None and "waiting for it to be validated" in text and watch.booted
    assert judge_reboot(status("b", "b", False, both, rebooting="falling back"), watch) == (None, "")
    assert judge_reboot(status("b", "b", True, both), watch) == (0, "3.0.0 booted from slot b and is validated")
    last = {"ok": False, "verdict": "firmware 3.0.0 failed its first boot"}
    verdict, text = judge_reboot(status("a", "a", True, both, last_update=last), watch)
    assert verdict == 1 and "fell back: 1.0.0 runs from slot a, not 3.0.0: firmware 3.0.0 failed" in text


def test_the_expected_version_comes_from_the_file_without_status(firmware) -> None:
    fw = firmware("2.0.0")
    assert _firmware_version(fw) == "2.0.0"
    assert RebootWatch.expecting(None, fw).version == "2.0.0"
    assert _firmware_version(Path(os.devnull)) is None


# --- end to end on a simulated device ---------------------------------------------------------------


def sshfwup(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sshfwup", *args], capture_output=True, text=True, timeout=timeout)


def upload_args(sim: Sim, fw: Path, *extra: str) -> list[str]:
    return ["upload", f"root@{sim.host}", str(fw), "-p", str(sim.port), "-i", str(sim.key.private),
            "--insecure-accept-host-key", *extra]  # fmt: skip


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return FAST


async def test_hot_swap_in_plain_lines_then_what_runs(sim: Sim, firmware) -> None:
    result = await anyio.to_thread.run_sync(lambda: sshfwup(*upload_args(sim, firmware("2.0.0"), "--wait")))
    text = result.stderr
    assert result.returncode == 0, text
    assert not ESCAPE.search(text), repr(text)
    lines = text.splitlines()
    assert any(re.fullmatch(r"upload 100%  \d+\.\d KB in \d+\.\d s, [\d.]+ [KMG]?B/s", line) for line in lines), text
    assert "fwup   100%" in lines and "100% [" not in text, text
    assert lines.index("fwup   100%") < lines.index("Success!")
    assert "fwup: Upgrading partition B" in lines
    assert any(line.startswith("sshfwup: hot reload: 1.0.0 → 2.0.0") for line in lines), text
    assert lines[-1].startswith("sshfwup: app 2.0.0 serves from slot b (pid "), text
    assert f"reboot pending: `ssh -p {sim.port} root@{sim.host} reboot` boots 2.0.0" in lines[-1], text


async def test_wait_after_a_reboot_reports_the_validated_firmware(sim: Sim, firmware) -> None:
    fw = firmware("3.0.0", changes=("system-file",))
    result = await anyio.to_thread.run_sync(lambda: sshfwup(*upload_args(sim, fw, "--wait", "--timeout", "120")))
    text = result.stderr
    assert result.returncode == 0, text
    assert "rebooting into 3.0.0 (slot b)" in text
    assert "sshfwup: waiting for 127.0.0.1 to reboot into 3.0.0 (up to 120 s)" in text
    assert re.search(r"sshfwup: 3\.0\.0 booted from slot b and is validated \(\d+\.\d s\)\n$", text), text
    assert sim.env()["nerves_fw_validated"] == "1" and sim.machine.state().boot_count == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("sim_config", [{"app": {**FAST["app"], "ready_timeout": 2}}])
async def test_wait_after_a_fallback_exits_non_zero(sim: Sim, firmware) -> None:
    fw = firmware("3.0.0", changes=("system-file",), app_behavior={"never_ready": True})
    result = await anyio.to_thread.run_sync(lambda: sshfwup(*upload_args(sim, fw, "--wait", "--timeout", "150")))
    text = result.stderr
    assert result.returncode == 1, text
    assert "rebooting into 3.0.0 (slot b)" in text
    assert "sshfwup: the device fell back: 1.0.0 runs from slot a, not 3.0.0" in text, text
    assert "failed its first boot" in text, text
    assert sim.app()["version"] == "1.0.0"


async def test_no_wait_ends_at_the_verdict(sim: Sim, firmware) -> None:
    result = await anyio.to_thread.run_sync(lambda: sshfwup(*upload_args(sim, firmware("2.0.0"), "--no-wait", "-q")))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[-1].startswith("sshfwup: hot reload:"), result.stderr
    assert "upload " not in result.stderr and "fwup   " not in result.stderr  # -q: no progress


async def test_first_contact_says_what_to_do(sim: Sim, firmware, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    args = ["upload", f"root@{sim.host}", str(firmware("2.0.0")), "-p", str(sim.port), "-i", str(sim.key.private),
            "--known-hosts", str(known)]  # fmt: skip
    result = await anyio.to_thread.run_sync(lambda: sshfwup(*args))
    text = result.stderr
    assert result.returncode == 255, text
    fingerprint = (sim.device.server_data_dir / "ssh_host_ed25519_key.pub").read_text().split()[1]
    assert f"{sim.host}:{sim.port} is not a known host: its host key is not in {known}" in text, text
    assert f"ssh-keyscan -p {sim.port} -t ed25519 {sim.host} >> {known}" in text
    assert "--insecure-accept-host-key" in text and "The device offers SHA256:" in text
    # following the hint works
    scan = subprocess.run(["ssh-keyscan", "-p", str(sim.port), "-t", "ed25519", sim.host], capture_output=True, text=True)
    assert fingerprint in scan.stdout
    known.write_text(scan.stdout)
    again = await anyio.to_thread.run_sync(lambda: sshfwup(*args, "-q"))
    assert again.returncode == 0, again.stderr
    # a changed key is told apart from an unknown one
    known.write_text(scan.stdout.replace(fingerprint, "AAAAC3NzaC1lZDI1NTE5AAAAIBd0uP8jrGgn8Sf4CjVLy5bVIt0J2IMeEwPzbvHAlq7C"))
    changed = await anyio.to_thread.run_sync(lambda: sshfwup(*args))
    assert changed.returncode == 255 and "does NOT match the one recorded" in changed.stderr, changed.stderr
    assert f"ssh-keygen -f {known} -R '[{sim.host}]:{sim.port}'" in changed.stderr


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["{fw}", "-i", "{tmp}/nope"], "identity file {tmp}/nope: no such file"),
        (["{fw}", "-i", "{tmp}"], "identity file {tmp}: is a directory, not a private key"),
        (["{fw}", "-i", "{tmp}/garbage"], "identity file {tmp}/garbage: not a usable private key ("),
        (["{tmp}"], "{tmp}: is a directory; give the firmware file (FILE.fw)"),
        (["{tmp}/missing.fw"], "{tmp}/missing.fw: no such file"),
        (["{fw}", "-p", "70000"], "-p 70000: a port is 1..65535"),
        (["{fw}", "--timeout", "0"], "--timeout 0: must be more than 0 seconds"),
    ],
    ids=["missing-key", "key-is-a-directory", "not-a-key", "directory", "missing-file", "bad-port", "bad-timeout"],
)
def test_bad_arguments_are_told_before_connecting(tmp_path: Path, args: list[str], expect: str) -> None:
    fw = tmp_path / "app.fw"
    fw.write_bytes(b"x")
    (tmp_path / "garbage").write_text("not a key\n")
    argv = [a.format(tmp=tmp_path, fw=fw) for a in args]
    # port 1 on loopback: nothing listens there, so a connection attempt would fail differently
    result = sshfwup("upload", "root@127.0.0.1", *argv[:1], "-p", "1", *argv[1:], timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"sshfwup upload: {expect.format(tmp=tmp_path)}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_version() -> None:
    from sshfwup import __version__

    result = sshfwup("--version", timeout=30)
    assert result.returncode == 0 and result.stdout == f"sshfwup {__version__}\n"


async def test_delta_from_sends_a_patch_from_what_the_device_runs(sim: Sim, firmware, tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    releases.mkdir()
    shutil.copy(firmware("1.0.0"), releases / "1.0.0.fw")  # what the device was flashed with
    v2 = firmware("2.0.0")
    env_cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = await anyio.to_thread.run_sync(
        lambda: sshfwup_env(env_cache, *upload_args(sim, v2, "--delta-from", str(releases), "--no-wait")))
    text = result.stderr
    assert result.returncode == 0, text
    assert "sending a delta patch 1.0.0 → 2.0.0" in text and "hot reload: 1.0.0 → 2.0.0" in text, text
    assert text.count("delta patch 1.0.0 → 2.0.0") == 1, text  # said once (not logged twice before)
    assert " INFO " not in text, text
    assert sim.app()["version"] == "2.0.0"
    assert list((tmp_path / "cache").rglob("*.fw"))  # made once, kept for the next device


async def test_delta_from_without_a_match_sends_the_full_file(sim: Sim, firmware, tmp_path: Path) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    result = await anyio.to_thread.run_sync(
        lambda: sshfwup_env({"XDG_CACHE_HOME": str(tmp_path / "cache")},
                            *upload_args(sim, firmware("2.0.0"), "--delta-from", str(empty), "--no-wait")))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "whole" in result.stderr and "hot reload" in result.stderr, result.stderr
    assert result.stderr.count("whole") == 1, result.stderr


def sshfwup_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sshfwup", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **env})  # fmt: skip


# --- Ctrl-C -------------------------------------------------------------------------------------------

# `sshfwup upload` with its sending slowed down (32 KiB at a time, 50 ms apart), so that a test
# can press Ctrl-C in the middle: the code under test is the CLI's own, only the pace differs.
THROTTLED = """
import sys, time
from sshfwup.dependency_warnings import silence
silence()
import sshfwup.host.client as client
from sshfwup.host import progress_display
client.CHUNK = 32 * 1024
_sent = progress_display.PlainDisplay.sent
def sent(self, n):
    time.sleep(0.05)
    _sent(self, n)
progress_display.PlainDisplay.sent = sent
from sshfwup.cli import main
sys.exit(main())
"""


async def _interrupted_upload(sim: Sim, firmware, *, stop_device: bool, twice: bool, written: bool = False
                              ) -> tuple[subprocess.CompletedProcess[str], float]:  # fmt: skip
    """Start a slowed upload, wait until the device holds the update lock, press Ctrl-C (SIGINT);
    ``stop_device``: freeze the device's server first (SIGSTOP), so that the status question
    gets no answer; ``twice``: a second Ctrl-C 0.5 s into that question; ``written``: wait until
    fwup has written part of slot b. Returns the result and
    the seconds from the (last) Ctrl-C to the exit."""
    fw = firmware("2.0.0", filler=2 * 1024 * 1024)
    argv = [sys.executable, "-c", THROTTLED, *upload_args(sim, fw, "--no-wait")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = sim.machine.state().server_pid  # type: ignore[union-attr]
    stopped = False
    try:
        await wait_until(lambda: sim.status()["update_in_progress"], timeout=30, what="the upload holding the lock")
        if written:
            await wait_until(lambda: (sim.status()["update"] or {}).get("percent"), timeout=30, what="fwup writing")
        else:
            await anyio.sleep(0.3)
        assert proc.poll() is None, proc.communicate()
        if stop_device:
            os.kill(server, signal.SIGSTOP)
            stopped = True
        proc.send_signal(signal.SIGINT)
        if twice:
            await anyio.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        pressed = time.monotonic()
        out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=60))
        took = time.monotonic() - pressed
    finally:
        if stopped:
            os.kill(server, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), took


@pytest.mark.parametrize("written", [False, True], ids=["before-fwup-wrote", "slot-b-partly-written"])
async def test_ctrl_c_mid_upload_says_what_the_device_did(sim: Sim, firmware, written: bool) -> None:
    result, took = await _interrupted_upload(sim, firmware, stop_device=False, twice=False, written=written)
    err = result.stderr
    assert result.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "CancelledError" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("sshfwup: interrupted: the device aborted the upload: "), err
    assert line.endswith("(from its status)") and "the client disconnected" in line, err
    # the device's own words (update/after_fwup.py what_changed): slot b held no firmware here
    partly = re.search(r"slot b \(which held no firmware\) (was|was handed to fwup and counts as) partly written and "
                       r"is marked incomplete: nothing boots it until a new upload completes; slot a \(1\.0\.0\) still "
                       r"runs and boots next", line)  # fmt: skip
    assert partly if written else (partly or "the device was not changed" in line), err
    assert [x for x in err.splitlines() if x.startswith("sshfwup: interrupted")] == [line], err
    assert took < 5, took
    print(f"\nCtrl-C to exit, with the device's answer: {took:.2f} s\n{line}")
    status = sim.status()
    assert not status["update_in_progress"], status  # the lock is released
    assert sim.env()["nerves_fw_active"] == "a" and sim.app()["version"] == "1.0.0"


@pytest.mark.parametrize("twice", [False, True], ids=["no-answer", "second-ctrl-c"])
async def test_ctrl_c_when_the_device_does_not_answer(sim: Sim, firmware, twice: bool) -> None:
    result, took = await _interrupted_upload(sim, firmware, stop_device=True, twice=twice)
    err = result.stderr
    assert result.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    line = err.splitlines()[-1]
    ask = f"run `ssh -p {sim.port} root@{sim.host} status`"
    if twice:
        assert line == f"sshfwup: interrupted again: not waiting for the device's answer; {ask}", err
        assert took < 2, took
    else:
        assert line == f"sshfwup: interrupted; the device could not be asked what it did (no answer within 5 s); {ask}", err
        assert 4.5 < took < 9, took
    print(f"\nCtrl-C to exit, the device frozen{' (Ctrl-C twice)' if twice else ''}: {took:.2f} s")
    wait_unlocked(sim, timeout=30)  # once it runs again, the device ends the cut upload
    assert sim.env()["nerves_fw_active"] == "a"


async def test_a_refused_upload_never_shows_upload_100(sim: Sim, firmware) -> None:
    """The device refuses a small firmware after reading its head; everything had gone into the
    SSH window by then, but the device never took it: no "upload 100%"."""
    result = await anyio.to_thread.run_sync(lambda: sshfwup(*upload_args(sim, firmware("3.0.0", platform="otherboard"))))
    text = result.stderr
    assert result.returncode == 1, text
    assert "upload 100%" not in text, text
    assert text.splitlines()[-1].startswith("sshfwup: update failed: Expecting platform="), text


def test_describing_what_an_interrupted_device_did() -> None:
    from sshfwup.host.client import Stage, describe_interrupted

    ask = "run `ssh d status`"
    busy = {"update_in_progress": True, "update": {"stage": "writing"}, "last_update": {"ok": True, "verdict": "old"}}
    assert describe_interrupted(busy, Stage.SENDING, ask) == (
        "interrupted: the device is still ending the upload (writing); run `ssh d status` to see how it ended")
    aborted = {"update_in_progress": False, "last_update": {"ok": False, "verdict": "upload aborted: cut\x1b[31m; a runs"}}
    assert describe_interrupted(aborted, Stage.SENDING, ask) == (
        "interrupted: the device aborted the upload: cut; a runs (from its status)")  # (escape codes removed)
    taken = {"update_in_progress": False, "last_update": {"ok": True, "verdict": "hot reload: 1 → 2"}}
    assert describe_interrupted(taken, Stage.SENDING, ask) == (
        "interrupted, but the device had already taken the whole upload: hot reload: 1 → 2 (from its status)")
    assert describe_interrupted(taken, Stage.DONE, ask) == "interrupted after the device's verdict: hot reload: 1 → 2 (from its status)"
    assert "records no update outcome" in describe_interrupted({"last_update": None}, Stage.SENDING, ask)
