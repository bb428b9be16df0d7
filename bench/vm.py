"""The QEMU device's figures (issue #22): sshfwup on a real boot (U-Boot → kernel → systemd).

- cold boot: power-on → SSH banner (host clock), and kernel start → READY=1 of sshfwup.service
  (the guest's own ``ActiveEnterTimestampMonotonic``: a Type=notify unit is active at READY=1);
- reboot round trip: ``ssh reboot`` → sshfwup answers SSH from the new boot, and → READY=1;
- a hot update (the app only) on the VM and on the simulated device in the same run: upload →
  verdict, and the device's own hot-reload time, with the ratios VM / simulator;
- ``sshfwup serve``'s RSS/PSS/USS in the guest (smaps_rollup), idle and after the upload.

TCG, one vCPU: a board's figures are better; the ratio to the simulator says what the real boot
costs on the same machine. Failures are rows; the exit status is non-zero if any step failed.

    .venv/bin/python bench/vm.py [--dir DIR]      # root; DIR: a VM directory to reuse (else built)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError

from sshfwup.vm.agent import guest_exec, wait_agent
from sshfwup.vm.errors import VmError
from sshfwup.vm.image import VmDir, build_vm, firmware
from sshfwup.vm.machine import Running, VmOptions, run_vm, wait_ssh

HOT_RELOAD = re.compile(r"hot reload: \S+ → \S+ in ([\d.]+) s")
VERDICT = re.compile(r"^sshfwup: (hot reload.*|.*reboot.*|update failed.*)$")


class Rows:
    """Figures and failures, printed as rows; a failure never stops the other steps."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []
        self.failed = 0

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"{name:<56} {value}", flush=True)

    async def step(self, name: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except (BenchError, VmError, OSError, TimeoutError, KeyError, ValueError, AssertionError) as e:
            self.failed += 1
            self.add(f"FAILED {name}", f"{type(e).__name__}: {e}".splitlines()[0][:200])


async def sh(running: Running, command: str) -> str:
    result = await guest_exec(running.agent, ["/bin/sh", "-c", command], timeout=60)
    if result.status != 0:
        raise BenchError(f"{command}: exit {result.status}: {result.stderr.strip()[:200]}")
    return result.stdout


async def ready_seconds(running: Running) -> float:
    """Kernel start → sshfwup.service active (READY=1), from the guest's monotonic clock."""
    out = await sh(running, "systemctl show -p ActiveEnterTimestampMonotonic --value sshfwup")
    value = int(out.strip() or 0)
    if value == 0:
        raise BenchError("sshfwup.service has not become active")
    return value / 1e6


async def serve_memory(running: Running) -> tuple[float, float, float]:
    pid = (await sh(running, "systemctl show -p MainPID --value sshfwup")).strip()
    fields: dict[str, int] = {}
    for line in (await sh(running, f"cat /proc/{pid}/smaps_rollup")).splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields["Rss"] / 1024, fields["Pss"] / 1024, uss / 1024


async def hot_upload(argv: list[str], fw: Path) -> tuple[float, float | None, str]:
    """(upload → verdict s, the device's hot-reload s, the verdict line)."""
    verdict: list[str] = []

    def on_line(at: float, line: str) -> None:
        if VERDICT.match(line) and not verdict:
            verdict.append(line)

    result = await common.upload(argv, fw, on_line=on_line, timeout=900)
    if result.returncode != 0 or not verdict:
        raise BenchError(f"upload failed (ssh exit {result.returncode}): {result.stdout[-300:]}")
    match = HOT_RELOAD.search(verdict[0])
    return result.seconds, float(match.group(1)) if match else None, verdict[0]


async def sim_hot_update(work: Path) -> tuple[float, float | None]:
    key = common.make_key(work / "uploader")
    old = common.sample_firmware(work, "1.0.0")
    new = common.sample_firmware(work, "2.0.0")
    async with common.sim_device(work, key, old) as sim:
        seconds, reload, _ = await hot_upload(common.ssh_argv(sim.ssh_port, key), new)
    return seconds, reload


async def main(args: argparse.Namespace) -> int:
    rows = Rows()
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    with common.workdir("vm") as work:
        path = args.dir or work / "vm"
        vm = VmDir(Path(path).resolve())
        if not vm.disk.is_file():
            t = time.monotonic()
            await anyio.to_thread.run_sync(build_vm, vm.path)
            rows.add("build (rootfs cached or not)", f"{time.monotonic() - t:.0f} s")
        hot_fw = await anyio.to_thread.run_sync(lambda: firmware(vm, "1.0.1").path)
        figures: dict[str, Any] = {}
        t0 = time.monotonic()
        async with run_vm(vm, VmOptions(boot_timeout=400)) as running:
            figures["power_on_to_ssh"] = time.monotonic() - t0
            rows.add("cold boot: power-on → SSH banner", f"{figures['power_on_to_ssh']:.1f} s")
            await wait_agent(running.agent, time.monotonic() + 120)

            async def cold_ready() -> None:
                figures["kernel_to_ready"] = await ready_seconds(running)
                rows.add("cold boot: kernel start → READY=1", f"{figures['kernel_to_ready']:.1f} s")

            async def memory(label: str) -> None:
                rss, pss, uss = await serve_memory(running)
                figures[f"serve_{label}"] = {"rss": rss, "pss": pss, "uss": uss}
                rows.add(f"sshfwup serve {label}: RSS / PSS / USS", f"{rss:.1f} / {pss:.1f} / {uss:.1f} MiB")

            async def vm_hot() -> None:
                seconds, reload, verdict = await hot_upload(_ssh_s(running), hot_fw)
                figures["vm_hot"] = (seconds, reload)
                rows.add("VM hot update (180 MB): upload → verdict", f"{seconds:.1f} s")
                rows.add("VM hot update: the device's hot reload", f"{reload:.1f} s" if reload else verdict[:80])

            async def reboot_round_trip() -> None:
                t = time.monotonic()
                await anyio.run_process(running.ssh_argv("reboot"), check=False)
                await anyio.sleep(5)  # until the old sshfwup stops answering
                deadline = time.monotonic() + 400
                while time.monotonic() < deadline:
                    try:
                        up = float((await sh(running, "cut -d' ' -f1 /proc/uptime")).strip())
                        if up < time.monotonic() - t + 5:
                            break
                    except (BenchError, VmError):
                        pass
                    await anyio.sleep(1)
                if not await wait_ssh(running.ssh_port, deadline):
                    raise BenchError("sshfwup did not answer SSH after the reboot")
                figures["reboot_to_ssh"] = time.monotonic() - t
                rows.add("reboot round trip: `ssh reboot` → SSH banner", f"{figures['reboot_to_ssh']:.1f} s")
                rows.add("reboot: kernel start → READY=1", f"{await ready_seconds(running):.1f} s")

            await rows.step("cold boot READY=1", cold_ready)
            await anyio.sleep(20)  # idle: the app started, nothing else happening
            await rows.step("serve idle memory", lambda: memory("idle"))
            await rows.step("VM hot update", vm_hot)
            await rows.step("serve memory after an upload", lambda: memory("after a 180 MB upload"))
            await rows.step("reboot round trip", reboot_round_trip)

        async def sim_hot() -> None:
            with tempfile.TemporaryDirectory(prefix="sim-", dir=work) as sim_dir:
                seconds, reload = await sim_hot_update(Path(sim_dir))
            figures["sim_hot"] = (seconds, reload)
            rows.add("simulator hot update (sample fw): upload → verdict", f"{seconds:.1f} s")
            rows.add("simulator: the device's hot reload", f"{reload:.2f} s" if reload else "?")
            if "vm_hot" in figures and reload and figures["vm_hot"][1]:
                rows.add("hot reload VM / simulator", f"{figures['vm_hot'][1] / reload:.1f}×")
                rows.add("upload → verdict VM / simulator", f"{figures['vm_hot'][0] / seconds:.1f}× (180 MB vs sample)")

        await rows.step("simulator hot update", sim_hot)
    common.save_results("vm", {"rows": rows.rows, "figures": figures, "failed": rows.failed})
    return 1 if rows.failed else 0


def _ssh_s(running: Running) -> list[str]:
    argv = running.ssh_argv("fwup")
    argv.insert(-2, "-s")
    return argv


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="a VM directory to reuse (sshfwup vm build DIR); default: built")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except (BenchError, VmError) as e:
        sys.exit(f"vm: {e}")
