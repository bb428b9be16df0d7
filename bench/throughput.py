"""Upload throughput and server CPU: sshfwup vs OpenSSH's sshd, same run, interleaved (issue #2).

``cat FILE | ssh -s HOST fwup`` with the real OpenSSH client into a discarding sink:

- sshd: ``/usr/sbin/sshd -D`` on 127.0.0.1, ``Subsystem fwup bench/discard_fwup.py --raw``.
  Server CPU = growth of the listener's reaped-children CPU over the session, minus the sink's
  own CPU (which it reports itself): every sshd process of the connection, nothing else.
- sshfwup: a simulated device whose ``[fwup] path`` is ``bench/discard_fwup.py`` (fwup's framing)
  and ``success_callback = ""``. Server CPU = the ``sshfwup serve`` process's own utime + stime.

MB/s is the sink's view (first payload byte → end of input; 1 MB = 10^6 bytes); the wall time of
the whole ``ssh`` run (connect, auth, upload, exit status) is shown next to it.

    .venv/bin/python bench/throughput.py [--quick] [--rounds N] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import common
from common import MB, BenchError, GiB, KeyPair, MiB, SimRun, Sshd

CIPHERS = (None, "aes128-gcm@openssh.com")  # None: OpenSSH's default choice (printed per server)
PY_SPY = os.environ.get("PY_SPY", "py-spy")
MB_RATIO_TARGET = 0.7  # issue 13 (was 0.5, issue 2)
CPU_RATIO_TARGET = 1.5  # issue 13 (was 3, issue 2)  # not a project dependency: a scratch venv's is fine


@dataclass(frozen=True)
class Sample:
    server: str  # "sshd" | "sshfwup"
    cipher: str
    size: int
    round: int
    mb_s: float
    wall: float
    cpu_user: float  # server CPU seconds for the whole connection
    cpu_system: float

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.size / GiB)


def _check(server: str, result: common.UploadResult, report: common.SinkReport, payload: Path) -> None:
    size = payload.stat().st_size  # zip_payload's "about size bytes"
    if result.returncode != 0 or report.payload_bytes != size or report.status != "ok":
        raise BenchError(
            f"{server}: upload of {size} bytes failed: ssh exit {result.returncode}, sink got "
            f"{report.payload_bytes} bytes ({report.status}); output: {(result.stdout + result.stderr)[-400:]!r}"
        )


async def measure_sshd(sshd: Sshd, key: KeyPair, payload: Path, size: int, cipher: str | None, rnd: int) -> Sample:
    sshd.wait_idle()
    before = common.reaped_children_cpu_times(sshd.pid)
    result = await common.upload(common.ssh_argv(sshd.port, key, cipher=cipher), payload)
    report = common.read_sink_report(sshd.report)
    sshd.wait_idle()
    cpu = common.reaped_children_cpu_times(sshd.pid) - before - report.cpu
    _check("sshd", result, report, payload)
    mb_s = size / report.data_seconds / MB
    return Sample("sshd", cipher or "default", size, rnd, mb_s, result.seconds, cpu.user, cpu.system)


async def measure_sshfwup(sim: SimRun, key: KeyPair, report_path: Path, payload: Path, size: int,
                          cipher: str | None, rnd: int, server: str = "sshfwup") -> Sample:  # fmt: skip
    pid = sim.server_pid
    before = common.cpu_times(pid)
    result = await common.upload(common.ssh_argv(sim.ssh_port, key, cipher=cipher), payload)
    report = common.read_sink_report(report_path)
    await anyio.sleep(0.3)  # the server closes the connection after the client's exit status
    cpu = common.cpu_times(pid) - before
    _check(server, result, report, payload)
    mb_s = size / report.data_seconds / MB
    return Sample(server, cipher or "default", size, rnd, mb_s, result.seconds, cpu.user, cpu.system)


def negotiated_cipher(port: int, key: KeyPair, cipher: str | None, empty: Path) -> str:
    """The cipher OpenSSH's client ends up with (an empty upload with LogLevel=DEBUG)."""
    argv = common.ssh_argv(port, key, cipher=cipher)
    argv[argv.index("LogLevel=ERROR")] = "LogLevel=DEBUG"
    with open(empty, "rb") as stdin:
        result = subprocess.run(argv, stdin=stdin, capture_output=True, text=True, timeout=30)
    for line in result.stderr.splitlines():
        if "kex: client->server cipher:" in line:
            return line.split("cipher:")[1].split()[0]
    return "?"


async def profile_upload(sim: SimRun, key: KeyPair, report_path: Path, payload: Path, out: Path,
                         cipher: str | None) -> list[str]:  # fmt: skip
    """One more sshfwup upload under py-spy; the hottest frames of the serve process.

    ``--gil`` samples only the thread holding the GIL: Python work, not the kernel's (a syscall
    releases the GIL) and not time spent preempted by the client or the sink on a busy machine —
    the user/system split of the figures above covers those.
    """
    py_spy = shutil.which(PY_SPY)
    assert py_spy is not None
    proc = subprocess.Popen(
        [py_spy, "record", "--pid", str(sim.server_pid), "--rate", "250", "--format", "raw", "--output", str(out),
         "--nonblocking", "--gil"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await anyio.sleep(1.0)
        await common.upload(common.ssh_argv(sim.ssh_port, key, cipher=cipher), payload)
        common.read_sink_report(report_path)
    finally:
        proc.send_signal(2)
        proc.wait(30)
    own: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    ours: Counter[str] = Counter()  # sshfwup's own frames, inclusive
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        own[_short(frames[-1])] += int(count)
        by_package[_package(frames[-1])] += int(count)
        for frame in {_short(f).rsplit(":", 1)[0] + ")" for f in frames
                      if "sshfwup/" in f and "cli.py" not in f and "__main__" not in f}:  # fmt: skip
            ours[frame] += int(count)
    if not total:
        return ["py-spy recorded no samples"]
    # py-spy leaves out idle threads and a loop waiting in epoll: these are busy samples only
    lines = [f"py-spy --gil: {total} samples of the serve process holding the GIL (250 Hz) during one "
             f"{_short_cipher(cipher or 'default')} upload; raw stacks: {out}",
             "self time by package: " + ", ".join(f"{p} {100 * n / total:.0f}%" for p, n in by_package.most_common())]
    lines += ["self time by frame:"] + [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(15)]
    lines += ["sshfwup's own frames, inclusive (the rest runs inside asyncssh's packet handling):"]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in ours.most_common(8)]
    return lines


def _short_cipher(name: str) -> str:
    return name.removesuffix("@openssh.com")


def _short(frame: str) -> str:
    # "function (path/to/package/module.py:123)" → "function (package/module.py:123)"
    name, _, where = frame.partition(" (")
    if not where:
        return name
    path = Path(where.rstrip(")"))
    return f"{name} ({path.parent.name}/{path.name})"


def _package(frame: str) -> str:
    where = frame.partition(" (")[2]
    for package in ("sshfwup", "asyncssh", "anyio", "asyncio", "cryptography"):
        if f"{package}/" in where:
            return package
    return "other"


Target = tuple[str, bool, str]


def _event_loop(pid: int) -> str:
    """uvloop when its extension is mapped into the process (a variant really runs on it)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
        return "uvloop" if "/uvloop/" in f.read() else "asyncio"


@dataclass(frozen=True)
class Variant:
    """A lever: serve's environment and config settings (``section.key``) on a second device."""

    env: dict[str, str]
    config: dict[str, dict[str, str]]


def _parse_variant(text: str) -> tuple[str, Variant]:
    label, _, assignments = text.partition(":")
    pairs = [a.split("=", 1) for a in assignments.split(",") if "=" in a]
    if not label or not pairs:
        raise BenchError(f"--variant {text!r}: expected LABEL:VAR=VALUE[,section.key=VALUE...]")
    config: dict[str, dict[str, str]] = defaultdict(dict)
    for name, value in pairs:
        if "." in name:
            section, key = name.split(".", 1)
            config[section][key] = value
    return label, Variant({n: v for n, v in pairs if "." not in n}, dict(config))


def summarize(
    samples: list[Sample], ciphers: dict[tuple[str, str], str], sizes: list[int], slow: str = "",
    variants: tuple[str, ...] = (),
) -> tuple[list[str], list[Target]]:
    by: dict[tuple[str, str, int], list[Sample]] = defaultdict(list)
    for s in samples:
        by[(s.server, s.cipher, s.size)].append(s)
    lines = [
        f"{'cipher':<24} {'size':>8} {'server':<8} {'MB/s runs':<22} {'MB/s':>6} {'wall s':>7} {'CPU-s/GiB':>9}"
        f" {'user+sys':>10}",
    ]
    ratios: list[tuple[str, float, float]] = []
    for cipher in sorted({s.cipher for s in samples}, key=lambda c: c != "default"):
        for size in sizes:
            medians = {}
            for server in ("sshd", "sshfwup", *variants):
                runs = by[(server, cipher, size)]
                mb = common.median([r.mb_s for r in runs])
                cpu = common.median([r.cpu_per_gib for r in runs])
                user = common.median([r.cpu_user / (r.size / GiB) for r in runs])
                system = common.median([r.cpu_system / (r.size / GiB) for r in runs])
                medians[server] = (mb, cpu)
                label = _short_cipher(cipher if cipher != "default" else ciphers.get(("sshfwup" if server in variants else server, cipher), "?"))
                lines.append(
                    f"{label:<24} {common.size_label(size):>8} {server:<8} {' '.join(f'{r.mb_s:.0f}' for r in runs):<22}"
                    f" {mb:6.0f} {common.median([r.wall for r in runs]):7.2f} {cpu:9.2f}"
                    f" {user:>5.2f}+{system:.2f}"
                )
            mb_ratio = medians["sshfwup"][0] / medians["sshd"][0]
            cpu_ratio = medians["sshfwup"][1] / medians["sshd"][1]
            ratios.append((f"{_short_cipher(label)} {common.size_label(size)}", mb_ratio, cpu_ratio))
            lines.append(f"{'':<24} {'':>8} {'ratio':<8} sshfwup/sshd: MB/s {mb_ratio:.2f}, CPU per GiB {cpu_ratio:.2f}x")
            for variant in variants:  # a lever: against sshd and against the default, same run
                lines.append(f"{'':<24} {'':>8} {'ratio':<8} {variant}/sshd: MB/s "
                             f"{medians[variant][0] / medians['sshd'][0]:.2f}, CPU per GiB "
                             f"{medians[variant][1] / medians['sshd'][1]:.2f}x; {variant}/sshfwup: MB/s "
                             f"{medians[variant][0] / medians['sshfwup'][0]:.2f}, CPU per GiB "
                             f"{medians[variant][1] / medians['sshfwup'][1]:.2f}x")  # fmt: skip
    worst_mb = min(ratios, key=lambda r: r[1])
    worst_cpu = max(ratios, key=lambda r: r[2])
    where = f" ({slow})" if slow else ""
    targets = [
        (f"throughput ratio sshfwup/sshd >= {MB_RATIO_TARGET}{where}", worst_mb[1] >= MB_RATIO_TARGET,
         f"lowest {worst_mb[1]:.2f} ({worst_mb[0]})"),
        (f"server CPU per GiB <= {CPU_RATIO_TARGET}x sshd{where}", worst_cpu[2] <= CPU_RATIO_TARGET,
         f"highest {worst_cpu[2]:.2f}x ({worst_cpu[0]})"),
    ]  # fmt: skip
    return lines, targets


async def main(args: argparse.Namespace) -> int:
    sizes = [int(m) * MiB for m in args.sizes.split(",")] if args.sizes else [64 * MiB] if args.quick else [256 * MiB, GiB]
    rounds = args.rounds or (2 if args.quick else 3)
    samples: list[Sample] = []
    with common.workdir("throughput") as work:
        key = common.make_key(work / "uploader")
        payloads = {size: common.make_payload(work / f"payload-{size}", size) for size in sizes}
        empty = common.make_payload(work / "probe", 64 * 1024)  # a server refuses what is not shaped like a .fw
        firmware = common.sample_firmware(work, "1.0.0")
        report_path = work / "sshfwup-sink.json"
        overrides = common.sink_overrides(report_path, expect=max(sizes))
        variants = dict(_parse_variant(v) for v in args.variant)
        with Sshd(work, key) as sshd, contextlib.ExitStack() as stack:
            async with common.sim_device(work, key, firmware, overrides=overrides) as sim, \
                    contextlib.AsyncExitStack() as devices:
                others: dict[str, tuple[SimRun, Path]] = {}
                for label, variant in variants.items():
                    vreport = work / f"sink-{label}.json"
                    voverrides = common.sink_overrides(vreport, expect=max(sizes))
                    for section, settings in variant.config.items():
                        voverrides[section] = voverrides.get(section, {}) | settings
                    vsim = await devices.enter_async_context(common.sim_device(
                        work, key, firmware, overrides=voverrides, name=f"device-{label}", env=variant.env))  # fmt: skip
                    others[label] = (vsim, vreport)
                    print(f"variant {label}: serve pid {vsim.server_pid} with {variant}; event loop "
                          f"{_event_loop(vsim.server_pid)}")  # fmt: skip
                slow = ""
                if args.slow_cpu:  # both servers (and the sinks they start) on the same throttled core
                    cpu = stack.enter_context(common.SlowCpu(args.cpu_percent))
                    cpu.confine(sshd.pid)
                    cpu.confine(sim.server_pid)
                    for vsim, _ in others.values():
                        cpu.confine(vsim.server_pid)
                    slow = cpu.describe()
                    print(f"servers on a slow CPU: {slow}")
                ciphers: dict[tuple[str, str], str] = {}
                for cipher in CIPHERS:
                    ciphers[("sshd", cipher or "default")] = negotiated_cipher(sshd.port, key, cipher, empty)
                    common.read_sink_report(sshd.report)
                    ciphers[("sshfwup", cipher or "default")] = negotiated_cipher(sim.ssh_port, key, cipher, empty)
                    common.read_sink_report(report_path)
                print(f"client: {subprocess.run(['ssh', '-V'], capture_output=True, text=True).stderr.strip()}; "
                      f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
                for (server, cipher), negotiated in sorted(ciphers.items()):
                    print(f"  {server:<8} -c {cipher:<22} → {negotiated}")
                print(f"sshd listener pid {sshd.pid}; sshfwup serve pid {sim.server_pid} ({_event_loop(sim.server_pid)}); "
                      f"serve RSS {common.status_kib(sim.server_pid, 'VmRSS') / 1024:.0f} MiB")  # fmt: skip
                for rnd in range(rounds):
                    for cipher in CIPHERS:
                        for size in sizes:
                            order = ["sshd", "sshfwup", *others]
                            order = order[rnd % len(order):] + order[: rnd % len(order)]  # rotate per round
                            for server in order:
                                if server == "sshd":
                                    s = await measure_sshd(sshd, key, payloads[size], size, cipher, rnd)
                                elif server in others:
                                    vsim, vreport = others[server]
                                    s = await measure_sshfwup(vsim, key, vreport, payloads[size], size, cipher, rnd,
                                                              server)  # fmt: skip
                                else:
                                    s = await measure_sshfwup(sim, key, report_path, payloads[size], size, cipher, rnd)
                                samples.append(s)
                                print(f"  round {rnd + 1}/{rounds} {s.cipher:<22} {common.size_label(size):>8} "
                                      f"{server:<8} {s.mb_s:6.0f} MB/s {s.wall:6.2f} s wall "
                                      f"{s.cpu:6.2f} CPU-s ({s.cpu_per_gib:.2f}/GiB)", flush=True)  # fmt: skip
                profile: list[str] = []
                if args.profile and shutil.which(PY_SPY) is None:
                    profile = [f"({PY_SPY} not found: pip install py-spy into a scratch venv, then PY_SPY=/path/to/py-spy)"]
                elif args.profile:
                    common.RESULTS.mkdir(exist_ok=True)
                    for cipher in CIPHERS:
                        out = common.RESULTS / f"pyspy-serve-{_short_cipher(cipher or 'default')}.txt"
                        profile += await profile_upload(sim, key, report_path, payloads[max(sizes)], out, cipher)
                peak = common.status_kib(sim.server_pid, "VmHWM") / 1024
    print()
    print(f"upload throughput (ssh -s into a discarding sink; median of {rounds} interleaved runs; "
          f"load average now {os.getloadavg()[0]:.2f}):")
    lines, targets = summarize(samples, ciphers, sizes, slow, tuple(variants))
    print("\n".join(lines))
    print(f"(sshfwup serve peak RSS over the whole run: {peak:.0f} MiB)")
    if profile:
        print("\n".join(profile))
    lines += [common.target(*t) for t in targets]
    common.save_results(
        ("throughput_quick" if args.quick else "throughput") + ("_slow_cpu" if args.slow_cpu else ""),
        {"samples": [asdict(s) | {"cpu_per_gib": s.cpu_per_gib} for s in samples],
         "negotiated": {f"{k[0]} {k[1]}": v for k, v in ciphers.items()}, "summary": lines, "profile": profile},
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB uploads, 2 rounds (seconds, not minutes)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3, quick 2)")
    parser.add_argument("--profile", action="store_true", help="one more sshfwup upload under py-spy; print hot spots")
    parser.add_argument("--slow-cpu", action="store_true", help="both servers on one core throttled to --cpu-percent")
    parser.add_argument("--cpu-percent", type=float, default=20.0)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:NAME=VALUE[,NAME=VALUE]",
                        help="also measure a second device whose serve runs with these environment variables "
                             "(NAME) and config settings (section.key, e.g. server.event_loop=uvloop): a lever, "
                             "same run, interleaved; repeatable")
    parser.add_argument("--sizes", help="comma-separated MiB, e.g. 256,1024 (default 256,1024; quick 64)")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"throughput: {e}")
