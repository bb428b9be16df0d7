"""Fleet roll-out with Ansible (issue #12): wall time and failed requests under load.

For each fleet size (6, 12) and each ``--forks`` value (1, 4, 12): a fresh fleet of simulated
devices running 1.0.0, each app under its own hey load (``--rate`` req/s per device); then
``ansible-playbook deploy/ansible/rollout.yml -e firmware=2.0.0.fw -f FORKS`` (a canary, 10 %,
the rest; a hot swap each, health gate after each device) is timed from start to exit. hey's
results are split by phase (before / during the roll-out / after) and summed over the fleet.

Baseline, same run: one hot update of one device with ``sshfwup.host.client.upload`` (no Ansible), the
median of ``--baseline-rounds``; the roll-out's wall time is printed as a ratio to N × baseline
(the same devices one after the other, without Ansible).

Target: 0 failed requests on any device during any roll-out.

    .venv/bin/python bench/fleet.py [--quick] [--sizes 6,12] [--forks 1,4,12] [--rate 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import common
from common import BenchError, KeyPair

from sshfwup.host.client import upload
from sshfwup.host.fleet import RecordingDisplay
from sshfwup.sim.fleet import SimFleet, rollout_command
from sshfwup.sim.loadgen import LoadGenerator, LoadSpec

FAILED_TARGET = 0


@dataclass(frozen=True)
class Rollout:
    devices: int
    forks: int
    wall: float  # ansible-playbook start → exit
    exit_status: int
    sent: int
    failed: int
    failed_during: int
    rate: float  # requests per second offered to the fleet, all devices together
    changed: int


async def baseline_upload(work: Path, key: KeyPair, v1: Path, v2: Path, rounds: int) -> float:
    """Median seconds of one hot update of one device with sshfwup's client (upload + wait)."""
    times = []
    for i in range(rounds):
        fleet = await anyio.to_thread.run_sync(lambda: SimFleet.start(work / f"baseline{i}", [v1], key))
        try:
            d = fleet.devices[0]
            began = time.monotonic()
            status = await upload("127.0.0.1", v2, port=d.ssh_port, username="root", identities=[str(key.private)],
                                  known_hosts=str(fleet.known_hosts), wait=True, display=RecordingDisplay())  # fmt: skip
            times.append(time.monotonic() - began)
            if status != 0:
                raise BenchError(f"baseline upload failed (exit {status})")
        finally:
            await anyio.to_thread.run_sync(fleet.close)
    return common.median(times)


async def one_rollout(work: Path, key: KeyPair, v1: Path, v2: Path, devices: int, forks: int,
                      args: argparse.Namespace) -> Rollout:  # fmt: skip
    fleet = await anyio.to_thread.run_sync(lambda: SimFleet.start(work, [v1] * devices, key))
    try:
        inventory = work / "inventory.yml"
        inventory.write_text(fleet.inventory())
        argv, env = rollout_command(work, inventory, v2, "-f", str(forks))
        async with AsyncExitStack() as stack:
            loads = [
                await stack.enter_async_context(LoadGenerator(
                    LoadSpec(f"http://127.0.0.1:{d.app_port}/", rate=args.rate, concurrency=args.concurrency)))
                for d in fleet.devices
            ]  # fmt: skip
            await anyio.sleep(args.before)
            for load in loads:
                await load.mark("during")
            began = time.monotonic()
            result = await anyio.to_thread.run_sync(
                lambda: subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False))
            wall = time.monotonic() - began
            for load in loads:
                await load.mark("after")
            await anyio.sleep(args.after)
        if result.returncode != 0:
            raise BenchError(f"{devices} devices, forks {forks}: ansible-playbook exit {result.returncode}\n"
                             f"{result.stdout[-3000:]}{result.stderr[-1000:]}")  # fmt: skip
        reports = [load.report for load in loads]
        during = [p for r in reports for p in r.phases if p.name == "during"]
        changed = sum(int(part.split("=")[1]) for line in result.stdout.splitlines() if "changed=" in line
                      for part in line.split() if part.startswith("changed="))  # fmt: skip
        return Rollout(
            devices, forks, wall, result.returncode,
            sent=sum(r.sent for r in reports), failed=sum(r.failed for r in reports),
            failed_during=sum(p.failed for p in during), rate=args.rate * devices, changed=changed,
        )  # fmt: skip
    finally:
        await anyio.to_thread.run_sync(fleet.close)


async def main(args: argparse.Namespace) -> int:
    sizes = [int(x) for x in args.sizes.split(",")]
    forks_list = [int(x) for x in args.forks.split(",")]
    if args.quick:
        args.before, args.after, args.baseline_rounds = 1.0, 1.0, 1
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    results: list[Rollout] = []
    with common.workdir("fleet") as work:
        key = common.make_key(work / "uploader")
        v1 = common.sample_firmware(work, "1.0.0")
        v2 = common.sample_firmware(work, "2.0.0")
        baseline = await baseline_upload(work, key, v1, v2, args.baseline_rounds)
        print(f"baseline: one device, sshfwup upload --wait (hot swap): {baseline:.2f} s (median of "
              f"{args.baseline_rounds})", flush=True)  # fmt: skip
        for devices in sizes:
            for forks in forks_list:
                run_dir = work / f"n{devices}-f{forks}"
                run_dir.mkdir()
                r = await one_rollout(run_dir, key, v1, v2, devices, forks, args)
                results.append(r)
                print(f"  {devices:>2} devices, forks {forks:>2}: {r.wall:6.1f} s "
                      f"({r.wall / (devices * baseline):.2f}× {devices} sequential uploads), changed={r.changed}, "
                      f"{r.failed_during} failed of {r.sent} requests", flush=True)  # fmt: skip
    lines = [
        "",
        f"roll-out of a hot update with deploy/ansible/rollout.yml (serial 1, 10 %, rest), hey {args.rate:g} req/s "
        "per device",
        f"{'devices':>7} {'forks':>5} {'wall s':>7} {'s/device':>8} {'vs seq.':>7} {'changed':>7} {'sent':>7} "
        f"{'failed':>6}",
    ]  # fmt: skip
    for r in results:
        lines.append(f"{r.devices:>7} {r.forks:>5} {r.wall:>7.1f} {r.wall / r.devices:>8.2f} "
                     f"{r.wall / (r.devices * baseline):>7.2f} {r.changed:>7} {r.sent:>7} {r.failed:>6}")  # fmt: skip
    lines.append(f"baseline (one device, sshfwup upload --wait, no Ansible): {baseline:.2f} s")
    print("\n".join(lines))
    failed = sum(r.failed for r in results)
    print()
    targets = [common.target(f"fleet: {FAILED_TARGET} failed requests during every roll-out", failed == FAILED_TARGET,
                             f"{failed} failed of {sum(r.sent for r in results)}")]  # fmt: skip
    data: dict[str, Any] = {
        "baseline_seconds": baseline,
        "runs": [r.__dict__ for r in results],
        "summary": lines + targets,
    }
    common.save_results("fleet_quick" if args.quick else "fleet", data)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s of load before and after, one baseline round")
    parser.add_argument("--sizes", default="6,12", help="fleet sizes (default 6,12)")
    parser.add_argument("--forks", default="1,4,12", help="ansible-playbook -f values (default 1,4,12)")
    parser.add_argument("--rate", type=float, default=20.0, help="hey requests per second per device (default 20)")
    parser.add_argument("--concurrency", type=int, default=2, help="hey workers per device (default 2)")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before the roll-out")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of load after it")
    parser.add_argument("--baseline-rounds", type=int, default=3)
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"fleet: {e}")
