"""The README's first command: a simulated A/B device, the server, a v1 → v2 hot update under
load that keeps a live stream open (state and connection hand-off), then a reboot-required
update — printing what happens as it happens.

    sudo ./scripts/demo.sh            (installs what it needs, then runs this)
    python -m sshfwup.demo [--rate 200] [--workdir .demo]

Everything is real except the board: OpenSSH's ``ssh`` uploads, the server is ``sshfwup serve``,
slots are squashfs images on loop devices, the boot env is read and written with libubootenv,
the load comes from ``hey``, and fwup is the real fwup on PATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sshfwup.dependency_warnings import silence

silence()  # `python -m sshfwup.demo` starts here, and the imports below load asyncssh

import anyio  # noqa: E402

from .device_output import OutputParser  # noqa: E402
from sshfwup.firmware.errors import FirmwareError  # noqa: E402
from sshfwup.sim.device import SimDevice, SimError, cleanup  # noqa: E402
from sshfwup.sim.firmware import find_fwup  # noqa: E402
from sshfwup.sim.host import free_port, ssh_keygen  # noqa: E402
from sshfwup.sim.loadgen import LoadGenerator, LoadSpec  # noqa: E402
from sshfwup.sim.machine import SimMachine  # noqa: E402
from sshfwup.sim.rootfs import build_sample_firmware  # noqa: E402
from sshfwup.sim.stale import remove_stale  # noqa: E402
from sshfwup.sim.stream_client import StreamClient  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class DemoError(Exception):
    """The demo cannot go on; the message says what the device reported (no traceback)."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    say(f"\n{bold}[{n}] {text}{plain}")


class Demo:
    def __init__(self, workdir: Path, rate: float) -> None:
        self.workdir = workdir.resolve()
        self.rate = rate
        self.fwup = find_fwup()
        self.key = ssh_keygen(ROOT / "keys" / "dev" / "id_ed25519", comment="sshfwup-demo").private
        self.device: SimDevice | None = None

    def ssh_argv(self, *args: str) -> list[str]:
        assert self.device is not None
        return [
            "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-i", str(self.key), "-p", str(self.device.ssh_port), *args,
        ]  # fmt: skip

    def _get_app(self) -> dict[str, Any]:
        assert self.device is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.device.app_port}/", timeout=2) as r:
            return json.loads(r.read())

    def app(self) -> dict[str, Any]:
        """The app's ``GET /``; DemoError with the device's own reason when it does not answer."""
        try:
            return self._get_app()
        except (OSError, ValueError) as e:  # URLError, HTTPError (a 503), timeouts, bad JSON
            raise DemoError(f"the app on the simulated device does not answer ({_what(e)}).\n{self.why_no_app()}") from None

    def why_no_app(self) -> str:
        """Why the app does not run, as the device says it: ``status --json`` over SSH, else the
        machine log's last lines."""
        assert self.device is not None
        try:
            done = subprocess.run(self.ssh_argv("root@127.0.0.1", "status", "--json"), capture_output=True,
                                  text=True, timeout=15, check=False)  # fmt: skip
            status = json.loads(done.stdout) if done.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError):
            status = None
        lines: list[str] = []
        if isinstance(status, dict):
            down, last = status.get("app_down"), status.get("app_last_exit")
            if down:
                lines.append(f"the device says: app not running for {down['for']:.0f} s: {down['reason']}")
            elif status.get("app"):
                app = status["app"]
                lines.append(f"the device says: app {app['version']} (pid {app['pid']}) is {app.get('state', 'running')}")
            if last:
                lines.append(f"its last exit: {last['reason']} (pid {last['pid']})")
                lines += ["its last output:", *(f"  | {line}" for line in last.get("output", [])[-10:])]
        if not lines:
            log_file = self.device.path / "machine.log"
            try:
                tail = log_file.read_text(errors="replace").splitlines()[-15:]
            except OSError:
                tail = []
            lines = [f"the device did not answer `status` either; the last lines of {log_file}:",
                     *(f"  | {line}" for line in tail)]  # fmt: skip
        return "\n".join(lines)

    def env(self, *names: str) -> str:
        """The boot variables that say which slot boots next and whether it validated, then ``names``."""
        assert self.device is not None
        return self.device.boot_summary(*names)

    async def upload(self, fw: Path) -> tuple[int, float | None]:
        """``cat fw | ssh -s device fwup``, showing the device's output; returns (exit status, time of Success!)."""
        say(f"  $ cat {fw.name} | ssh -s device fwup")
        success_at = None
        parser = OutputParser()
        last_pct = -1
        with fw.open("rb") as f:
            proc = await anyio.open_process(
                self.ssh_argv("-s", "root@127.0.0.1", "fwup"), stdin=f, stderr=subprocess.STDOUT
            )
            assert proc.stdout is not None
            async for chunk in proc.stdout:
                for item in parser.feed(chunk.decode("utf-8", errors="replace")):
                    if item.percent is not None and item.percent // 25 > last_pct:
                        last_pct = item.percent // 25
                        say(f"  │ fwup {item.percent:3d}%")
                    elif item.text is not None:
                        if item.text == "Success!" and success_at is None:
                            success_at = time.monotonic()
                        say(f"  │ {item.text}")
            status = await proc.wait()
        say(f"  └ exit status {status}")
        return status, success_at

    async def wait_version(self, version: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._get_app()["version"] == version:
                    return time.monotonic()
            except (OSError, ValueError):
                pass
            await anyio.sleep(0.02)
        raise DemoError(f"{version} never answered within {timeout:g} s.\n{self.why_no_app()}")

    async def run(self) -> int:
        say("sshfwup demo: zero-downtime A/B firmware updates over SSH, on a simulated device")
        # What a killed earlier demo or test run left (its owner is gone); live runs' devices stay.
        try:
            report = await anyio.to_thread.run_sync(remove_stale)
            lines = [*report.removed, *(f"could not remove: {p}" for p in report.problems)]
        except SimError as e:
            lines = [f"could not look for stale simulated devices: {e}"]
        for line in lines:
            say(f"  cleaned up: {line}")
        version = subprocess.run([self.fwup, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        say(f"  fwup: {version} at {self.fwup}")

        step(1, "Build firmware 1.0.0, 2.0.0 (app-only, marked hot) and 3.0.0 (changes /etc)")
        fwdir = self.workdir / "firmware"
        shutil.rmtree(fwdir, ignore_errors=True)
        v1 = build_sample_firmware(fwdir / "v1", version="1.0.0", name="v1")
        v2 = build_sample_firmware(fwdir / "v2", version="2.0.0", name="v2")
        v3 = build_sample_firmware(fwdir / "v3", version="3.0.0", name="v3", changes=("system-file",))
        for fw in (v1, v2, v3):
            say(f"  {fw.relative_to(self.workdir.parent)}  {fw.stat().st_size / 1024:.0f} KiB")

        step(2, "Provision a simulated A/B device with 1.0.0 (fwup -t complete) and boot it")
        path = self.workdir / "device"
        cleanup(path)
        shutil.rmtree(path, ignore_errors=True)
        self.device = SimDevice.create(
            path, firmware=v1, fwup=self.fwup, authorized_keys=[Path(f"{self.key}.pub").read_text().strip()],
            ssh_port=free_port(), app_port=free_port(), config_overrides={"app": {"handoff": True}},
        )  # fmt: skip
        async with SimMachine.start(path) as machine:
            await machine.wait_up(timeout=60)
            app = self.app()
            say(f"  device up: slot {machine.state().slot}, SSH on 127.0.0.1:{self.device.ssh_port}")
            say(f"  app: {app['version']} from slot {app['slot']} (pid {app['pid']}) on http://127.0.0.1:{self.device.app_port}/")
            say(f"  boot env: {self.env('a.nerves_fw_version')}")

            step(3, f"Hot update 1.0.0 → 2.0.0 with `ssh -s` while hey sends {self.rate:.0f} req/s to the app"
                    " and a client holds a live stream (GET /stream, a numbered line every 50 ms)")
            url = f"http://127.0.0.1:{self.device.app_port}/"
            stream = StreamClient(self.device.app_port, interval=0.05)
            async with LoadGenerator(LoadSpec(url, rate=self.rate)) as load, anyio.create_task_group() as holder:
                await holder.start(stream.run)
                await anyio.sleep(5)
                await load.mark("during")
                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    result: dict[str, Any] = {}

                    async def watch() -> None:
                        result["new"] = await self.wait_version("2.0.0")

                    tg.start_soon(watch)
                    status, ok_at = await self.upload(v2)
                await load.mark("after")
                await anyio.sleep(5)
                holder.cancel_scope.cancel()  # the stream client; the load stops as the block ends
            report = load.report
            say("")
            say(report.table())
            if ok_at is not None:
                say(f"  fwup OK → 2.0.0 answering: {result['new'] - ok_at:.2f} s; upload start → 2.0.0: {result['new'] - started:.2f} s")
            app = self.app()
            say(f"  app: {app['version']} from slot {app['slot']} (pid {app['pid']}), boot count {machine.state().boot_count} (no reboot)")
            say(f"  boot env: {self.env('b.nerves_fw_version')}")
            failed = report.failed
            say(f"  requests: {report.sent} sent, {failed} failed, {report.refused} refused")
            broken = stream.first_break()
            kept = not stream.closed and broken is None and stream.versions() == ["1.0.0", "2.0.0"]
            say(f"  live stream: {len(stream.lines)} lines on one connection, sent by {' then '.join(stream.versions())};"
                f" {'still open' if not stream.closed else 'CUT'}, {broken or 'no gap, no repeat'};"
                f" longest pause {stream.longest_silence:.2f} s")  # fmt: skip

            step(4, "Upload 3.0.0 now: refused, because a reboot is pending (slot a is still the running root)")
            await self.upload(v3)

            step(5, "Reboot (ssh device reboot): the device boots 2.0.0 from slot b and validates it")
            subprocess.run(self.ssh_argv("root@127.0.0.1", "reboot"), check=False, capture_output=True)
            state = await machine.wait_boot(2, timeout=60)
            await self._wait_validated()
            say(f"  booted slot {state.slot}; app {self.app()['version']}; boot env: {self.env()}")

            step(6, "Update to 3.0.0, which changes /etc: the device decides a reboot is required")
            status3, _ = await self.upload(v3)
            state = await machine.wait_boot(3, timeout=60)
            await self._wait_validated()
            say(f"  booted slot {state.slot}; app {self.app()['version']}; boot env: {self.env('a.nerves_fw_version')}")

            step(7, "Device status (ssh device status)")
            out = subprocess.run(self.ssh_argv("root@127.0.0.1", "status"), capture_output=True, text=True)
            for line in out.stdout.splitlines():
                say(f"  {line}")
        say("\ndevice powered off; mounts, loop devices and processes cleaned up.")
        say("by hand: `sshfwup sim --help` (a device with SSH on 127.0.0.1:2222 and its app on :8080;")
        say("         `ssh -p 2222 root@127.0.0.1 logs -f`, `sshfwup upload -p 2222 root@127.0.0.1 FILE.fw --wait`)")
        ok = status == 0 and failed == 0 and status3 == 0 and kept
        say("demo " + ("succeeded" if ok else "FAILED"))
        return 0 if ok else 1

    async def _wait_validated(self, timeout: float = 60) -> None:
        assert self.device is not None
        deadline = time.monotonic() + timeout
        while not self.device.boot_validated():
            if time.monotonic() > deadline:
                raise DemoError(f"the new firmware was not validated within {timeout:g} s.\n{self.why_no_app()}")
            await anyio.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sshfwup.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200, help="requests per second during the hot update")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo", help="where the device and firmware live")
    args = parser.parse_args(argv)
    try:
        demo = Demo(args.workdir, args.rate)
    except FirmwareError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    try:
        return anyio.run(demo.run)
    except (DemoError, SimError) as e:
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        cleanup(args.workdir.resolve() / "device")


def _what(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    reason = getattr(error, "reason", None) or error
    return str(reason) or type(reason).__name__


if __name__ == "__main__":
    sys.exit(main())
