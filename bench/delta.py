"""Delta updates (issue #10): full ``.fw`` vs patch size, and upload-to-serving time on a slow link.

A realistic root filesystem — the simulated device's sample tree plus real files from this
Debian machine (Python 3.11's standard library, Perl's modules, zoneinfo, i18n locales, shared
libraries, system Python packages; no random filler, which neither compresses nor deltas like
real content) — of at least 40 MiB as squashfs, with the sample app in /srv/app and a ~1 MiB
vendored dependency (rich) in /srv/app/vendor. Every firmware is built with
``sshfwup.host.firmware_build`` (as ``sshfwup firmware build``) and every patch with
``sshfwup firmware delta``'s code. From 1.0.0:

- (a) 1.0.1: one app source file changed (app.py, one line; VERSION says 1.0.1)
- (b) 1.0.2: the vendored dependency replaced by another release of it (rich from the venv's
  pip instead of Debian's pip)
- (c) 1.0.3: one /etc file changed (a line added to /etc/services): a reboot update

Printed: full .fw size, patch size and ratio for each, and how long making the patch took.
Target: (a) patch <= 1 % of the full .fw.

Then, over a link throttled to ``--rate`` (1 MB/s) by a TCP proxy on 127.0.0.1 in front of a
simulated device's SSH port: the time from the upload's start (``ssh -s``) to 1.0.1 answering
on the app's port (polled from outside), for the full image and for the patch, each on a fresh
device running 1.0.0 (real fwup, the real pipeline: hot swap).

    .venv/bin/python bench/delta.py [--rate 1e6] [--sizes-only|--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import common
from common import MB, BenchError, KeyPair, MiB

from sshfwup.host.firmware_build import build_release
from sshfwup.host.firmware_delta import make_patch
from sshfwup.sim.layout import Layout
from sshfwup.sim.loadgen import poll_version
from sshfwup.sim.rootfs import make_rootfs

RATIO_TARGET = 0.01
VERDICT = re.compile(r"^sshfwup: (hot reload.*|reboot required.*|update failed.*)$")
MIN_ROOTFS = 40 * MiB
LAYOUT = Layout(rootfs_count=262144)  # 128 MiB slots: the default 32 MiB ones cannot hold this rootfs
VARIABLES = {"ROOTFS_A_PART_COUNT": str(LAYOUT.rootfs_count)}  # deploy/fwup.conf derives the rest

# Real files of this machine (Debian 12), copied as they are; a missing one is skipped.
SYSTEM_TREES = (
    "/usr/lib/python3.11",
    "/usr/lib/python3/dist-packages",
    "/usr/share/perl",
    "/usr/lib/x86_64-linux-gnu/perl",
    "/usr/lib/x86_64-linux-gnu/perl-base",
    "/usr/share/zoneinfo",
    "/usr/share/i18n",
    "/usr/share/ca-certificates",
)
SYSTEM_FILES = (
    "/usr/bin/python3.11",
    "/usr/bin/perl",
    "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
    "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl/openssl.cnf",
)
DEPENDENCY = "rich"  # the vendored ~1 MiB app dependency
DEPENDENCY_RELEASES = (
    Path("/usr/lib/python3/dist-packages/pip/_vendor") / DEPENDENCY,  # Debian's pip (python3-pip)
    Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "pip"
    / "_vendor" / DEPENDENCY,  # the venv's pip (a later release)
)  # fmt: skip


def _ignore_caches(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


def dependency_releases() -> tuple[Path, Path | None]:
    """Two releases of the dependency, or one (then (b) edits it instead: said in the output)."""
    found = [p for p in DEPENDENCY_RELEASES if p.is_dir()]
    if not found:
        raise BenchError(f"no copy of {DEPENDENCY} found in {', '.join(map(str, DEPENDENCY_RELEASES))}")
    return found[0], found[1] if len(found) > 1 else None


def base_tree(dest: Path, version: str) -> Path:
    """The sample tree + real system files + the app with its vendored dependency."""
    root = make_rootfs(dest, version=version)
    for source in SYSTEM_TREES:
        if Path(source).is_dir():
            shutil.copytree(source, root / source.lstrip("/"), symlinks=True, dirs_exist_ok=True)
    for source in SYSTEM_FILES:
        if Path(source).is_file():
            target = root / source.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    old, _ = dependency_releases()
    shutil.copytree(old, root / "srv/app/vendor" / DEPENDENCY, ignore=_ignore_caches)
    return root


def variant(base: Path, dest: Path, version: str, case: str) -> tuple[Path, str]:
    """A copy of ``base`` with one change; returns the tree and what changed."""
    shutil.copytree(base, dest, symlinks=True)
    (dest / "srv/app/VERSION").write_text(f"{version}\n")
    if case == "app":
        with (dest / "srv/app/app.py").open("a") as f:
            f.write(f"# {version}: a one-line fix\n")
        return dest, "/srv/app/app.py: one line (and VERSION)"
    if case == "dependency":
        target = dest / "srv/app/vendor" / DEPENDENCY
        old, new = dependency_releases()
        if new is not None and new.resolve() != old.resolve():
            shutil.rmtree(target)
            shutil.copytree(new, target, ignore=_ignore_caches)
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            return dest, f"/srv/app/vendor/{DEPENDENCY}: another release ({new.parent.parent}), {size / MiB:.1f} MiB"
        edited = sorted(target.rglob("*.py"))[::4]
        for path in edited:
            path.write_text(path.read_text() + f"\n# {version}\n")
        return dest, f"/srv/app/vendor/{DEPENDENCY}: {len(edited)} files edited (one release found)"
    if case == "etc":
        with (dest / "etc/services").open("a") as f:
            f.write(f"sshfwup-bench   9999/tcp   # {version}\n")
        return dest, "/etc/services: one line (a reboot update)"
    raise ValueError(case)


def build(tree: Path, out: Path, version: str, hot: bool) -> Path:
    built = build_release(tree, out, version=version, kernel="/boot/zImage", dtbs=["/boot/sim.dtb"], hot=hot,
                          variables=VARIABLES)  # fmt: skip
    return built.path


@dataclass(frozen=True)
class SizeRow:
    case: str
    change: str
    version: str
    full: int
    patch: int
    seconds: float  # making the patch

    @property
    def ratio(self) -> float:
        return self.patch / self.full


@dataclass(frozen=True)
class TimeRow:
    what: str
    sent: int
    to_fwup_ok: float | None  # upload start → fwup's Success! (the whole upload is through, fwup done)
    to_serving: float | None  # upload start → the new version answering
    to_exit: float  # upload start → ssh exits (after the pipeline's observation window)
    verdict: str


async def serving_time(work: Path, key: KeyPair, base_fw: Path, payload: Path, version: str, rate: float,
                       what: str) -> TimeRow:  # fmt: skip
    """A fresh device running 1.0.0; ``payload`` through the throttled link; start → ``version`` answering."""
    work.mkdir()
    async with common.sim_device(work, key, base_fw, layout=LAYOUT) as sim:
        await poll_version(sim.app_url, "1.0.0", timeout=30)
        verdict = ""
        ok_at: float | None = None

        def on_line(at: float, line: str) -> None:
            nonlocal verdict, ok_at
            if line == "Success!" and ok_at is None:
                ok_at = at
            elif VERDICT.match(line) and not verdict:
                verdict = line

        async with common.throttled_proxy(sim.ssh_port, rate) as port:
            started = time.monotonic()
            serving_at: float | None = None

            async def watch() -> None:
                nonlocal serving_at
                serving_at = await poll_version(sim.app_url, version, timeout=600, interval=0.02)

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                result = await common.upload(common.ssh_argv(port, key), payload, on_line=on_line, timeout=900)
                if result.returncode != 0:
                    tg.cancel_scope.cancel()
        if result.returncode != 0:
            raise BenchError(f"{what}: upload failed (ssh exit {result.returncode}):\n{result.stdout[-1500:]}")
    return TimeRow(what, payload.stat().st_size, None if ok_at is None else ok_at - started,
                   None if serving_at is None else serving_at - started, result.ended - started, verdict)  # fmt: skip


def size(n: int) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


async def main(args: argparse.Namespace) -> int:
    print(f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs", flush=True)
    with common.workdir("delta") as work:
        t = time.monotonic()
        base = base_tree(work / "tree-1.0.0", "1.0.0")
        base_fw = build(base, work / "1.0.0.fw", "1.0.0", hot=True)
        rootfs = _rootfs_size(base_fw)
        print(f"1.0.0: {size(base_fw.stat().st_size)} .fw, rootfs squashfs {size(rootfs)} "
              f"(tree and build {time.monotonic() - t:.0f} s)", flush=True)  # fmt: skip
        if rootfs < MIN_ROOTFS:
            raise BenchError(f"the root filesystem is only {size(rootfs)}; the bench needs >= {size(MIN_ROOTFS)}")
        rows: list[SizeRow] = []
        firmware: dict[str, Path] = {}
        for case, version in (("app", "1.0.1"), ("dependency", "1.0.2"), ("etc", "1.0.3")):
            tree, change = variant(base, work / f"tree-{version}", version, case)
            fw = build(tree, work / f"{version}.fw", version, hot=case != "etc")
            shutil.rmtree(tree)
            t = time.monotonic()
            patch = make_patch(base_fw, fw, work / f"1.0.0-to-{version}.fw")
            rows.append(SizeRow(case, change, version, fw.stat().st_size, patch.size, time.monotonic() - t))
            firmware[version] = fw
            print(f"({version}: {change}; patch made in {rows[-1].seconds:.1f} s)", flush=True)
        times: list[TimeRow] = []
        if not args.sizes_only:
            key = common.make_key(work / "uploader")
            for what, payload in (("delta", work / "1.0.0-to-1.0.1.fw"), ("full", firmware["1.0.1"])):
                print(f"(timing the {what} upload at {args.rate / MB:g} MB/s...)", flush=True)
                times.append(await serving_time(work / f"device-{what}", key, base_fw, payload, "1.0.1", args.rate,
                                                what))  # fmt: skip
    lines = ["", f"root filesystem: {size(rootfs)} squashfs (real Debian/Python files), app in /srv/app",
             "", f"{'case':<28} {'full .fw':>11} {'patch':>11} {'ratio':>8}  change"]  # fmt: skip
    labels = {"app": "(a) app source file", "dependency": "(b) ~1 MiB dependency", "etc": "(c) /etc file"}
    for r in rows:
        lines.append(f"{labels[r.case]:<28} {size(r.full):>11} {size(r.patch):>11} {r.ratio:>8.3%}  {r.change}")
    if times:
        lines += ["", f"link throttled to {args.rate / MB:g} MB/s (TCP proxy), upload start → 1.0.1 answering:",
                  f"{'upload':<8} {'sent':>11} {'fwup OK s':>10} {'serving s':>10} {'ssh exit s':>11}  verdict"]  # fmt: skip
        for tr in times:
            ok = f"{tr.to_fwup_ok:.1f}" if tr.to_fwup_ok is not None else "never"
            serving = f"{tr.to_serving:.1f}" if tr.to_serving is not None else "never"
            lines.append(f"{tr.what:<8} {size(tr.sent):>11} {ok:>10} {serving:>10} {tr.to_exit:>11.1f}  {tr.verdict}")
        full, delta = (next(x for x in times if x.what == w) for w in ("full", "delta"))
        if full.to_serving and delta.to_serving:
            lines.append(f"delta/full: {delta.to_serving / full.to_serving:.3f} "
                         f"({full.to_serving / delta.to_serving:.0f}x faster)")  # fmt: skip
    print("\n".join(lines))
    print()
    app = rows[0]
    targets = [common.target("(a) one app file: patch <= 1 % of the full .fw", app.ratio <= RATIO_TARGET,
                             f"{size(app.patch)} of {size(app.full)} = {app.ratio:.3%}")]  # fmt: skip
    data: dict[str, Any] = {
        "rootfs_bytes": rootfs,
        "sizes": [{"case": r.case, "change": r.change, "full": r.full, "patch": r.patch, "ratio": r.ratio,
                   "patch_seconds": r.seconds} for r in rows],  # fmt: skip
        "rate": args.rate,
        "times": [{"what": x.what, "sent": x.sent, "to_fwup_ok": x.to_fwup_ok, "to_serving": x.to_serving,
                   "to_exit": x.to_exit, "verdict": x.verdict} for x in times],  # fmt: skip
        "summary": [*lines, *targets],
    }
    common.save_results("delta_sizes" if args.sizes_only else "delta", data)
    return 0


def _rootfs_size(fw: Path) -> int:
    from sshfwup.firmware.archive import read_firmware

    return read_firmware(fw).meta.resources["rootfs.img"].length


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1e6, help="link speed in bytes/s each way (default 1e6)")
    parser.add_argument("--sizes-only", "--quick", action="store_true", help="sizes only, no device and no timing")
    try:
        sys.exit(anyio.run(main, parser.parse_args()))
    except BenchError as e:
        sys.exit(f"delta: {e}")
