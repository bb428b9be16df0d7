"""sshfwup as a Debian package, built from this checkout for the guest.

Why not dh-virtualenv: it builds in a source package's build tree with the host's Python and
needs debhelper and a debian/ directory; here the environment must be made by the *guest's*
``/usr/bin/python3`` (bookworm's 3.11) so its paths and ABI are the device's. So:

1. on the host, ``pip download --require-hashes`` fetches exactly the locked wheels of sshfwup's
   runtime dependencies (requirements-lock.txt, cut to what ``sshfwup`` needs at run time), and
   ``pip wheel`` builds sshfwup's own wheel from the checkout;
2. inside the bookworm chroot, ``/usr/bin/python3 -m venv /opt/sshfwup`` and ``pip install
   --no-index --require-hashes`` of those wheels (then sshfwup's wheel, without dependencies);
3. ``dpkg-deb --build`` packs /opt/sshfwup, ``/usr/bin/sshfwup`` (a symlink: the unit as shipped
   runs /usr/bin/sshfwup) and ``deploy/sshfwup.service`` as shipped; ``dpkg -i`` installs it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from sshfwup import __version__
from sshfwup.vm.errors import VmError

log = logging.getLogger(__name__)

__all__ = ["PREFIX", "build_and_install", "runtime_lock"]

PREFIX = "/opt/sshfwup"
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(root: str = "sshfwup") -> set[str]:
    """The distributions ``root`` needs at run time (no extras), from the installed metadata."""
    try:
        from packaging.markers import Marker
    except ImportError:  # pragma: no cover - packaging is in the lock
        Marker = None  # noqa: N806
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if _norm(name) in seen:
            continue
        seen.add(_norm(name))
        for req in importlib.metadata.requires(name) or []:
            spec, _, marker = req.partition(";")
            if "extra" in marker:
                continue
            if marker.strip() and Marker is not None and not Marker(marker.strip()).evaluate():
                continue
            match = _NAME.match(spec.strip())
            if match:
                todo.append(match.group(1))
    seen.discard(_norm(root))
    return seen


def runtime_lock(lock_text: str) -> str:
    """The blocks of requirements-lock.txt that sshfwup needs at run time, hashes and all."""
    wanted = _closure()
    out: list[str] = []
    keep = False
    for line in lock_text.splitlines():
        if line[:1].strip() and not line.startswith("#"):
            match = _NAME.match(line)
            keep = bool(match) and _norm(match.group(1)) in wanted
        elif line.startswith("#"):
            keep = False
        if keep:
            out.append(line)
    text = "\n".join(out) + "\n"
    found = {_norm(m.group(1)) for m in map(_NAME.match, out) if m}
    if not wanted <= found:
        raise VmError(f"requirements-lock.txt lacks {sorted(wanted - found)}: run scripts/lock.sh")
    return text


def _run(argv: list[str], *, what: str, timeout: float = 600) -> None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise VmError(f"{what}: no result within {timeout:.0f} s ({' '.join(argv[:4])} ...)") from None
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise VmError(f"{what} failed (exit status {result.returncode}):\n{tail}")


def build_and_install(root: Path, work: Path, *, repo: Path, out: Path) -> Path:
    """Build ``sshfwup_<version>_amd64.deb`` into ``out`` with the chroot ``root``'s Python and
    install it there with dpkg. ``work`` is scratch space (removed by the caller)."""
    wheels = root / "tmp" / "sshfwup-wheels"
    wheels.mkdir(parents=True)
    lock = wheels / "runtime-lock.txt"
    lock.write_text(runtime_lock((repo / "requirements-lock.txt").read_text()))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "download", "--require-hashes", "--no-deps", "--only-binary=:all:",
          "-r", str(lock), "-d", str(wheels)], what="downloading the locked wheels")  # fmt: skip
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(repo)],
         what="building sshfwup's wheel")  # fmt: skip
    inside = "/tmp/sshfwup-wheels"
    chroot = ["chroot", str(root)]
    _run([*chroot, "/usr/bin/python3", "-m", "venv", PREFIX], what="making the venv with the guest's python3")
    venv_pip = [*chroot, f"{PREFIX}/bin/python", "-m", "pip", "--disable-pip-version-check", "-q", "install",
                "--no-index", "--no-compile"]  # fmt: skip
    _run([*venv_pip, "--require-hashes", "--no-deps", "-r", f"{inside}/runtime-lock.txt",
          "--find-links", inside], what="installing the locked dependencies in the guest")  # fmt: skip
    wheel = next(wheels.glob("sshfwup-*.whl")).name
    _run([*venv_pip, "--no-deps", f"{inside}/{wheel}"], what="installing sshfwup in the guest")
    # hash-checked bytecode: the squashfs gives every file the same mtime, which makes the usual
    # timestamp-checked .pyc stale, and a read-only root cannot store new ones (every start would
    # compile everything again: 20+ s under QEMU's TCG)
    _run([*chroot, f"{PREFIX}/bin/python", "-m", "compileall", "-q", "-f", "--invalidation-mode", "unchecked-hash",
          PREFIX], what="compiling the venv")  # fmt: skip
    shutil.rmtree(wheels)

    pkg = work / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / PREFIX.lstrip("/")).parent.mkdir(parents=True)
    shutil.move(str(root / PREFIX.lstrip("/")), str(pkg / PREFIX.lstrip("/")))
    (pkg / "usr/bin").mkdir(parents=True)
    (pkg / "usr/bin/sshfwup").symlink_to(f"{PREFIX}/bin/sshfwup")
    (pkg / "lib/systemd/system").mkdir(parents=True)
    shutil.copy2(repo / "deploy" / "sshfwup.service", pkg / "lib/systemd/system/sshfwup.service")
    (pkg / "DEBIAN/control").write_text(
        "Package: sshfwup\n"
        f"Version: {__version__}\n"
        "Architecture: amd64\n"
        "Maintainer: sshfwup <sshfwup@localhost>\n"
        "Depends: python3 (>= 3.11), python3 (<< 3.12), libubootenv-tool, util-linux, mount\n"
        "Section: admin\nPriority: optional\n"
        "Description: zero-downtime A/B firmware updates over SSH\n"
        " sshfwup serve in its own environment (/opt/sshfwup) with the locked dependencies.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    deb = out / f"sshfwup_{__version__}_amd64.deb"
    _run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(pkg), str(deb)], what="packing the .deb")
    shutil.copy2(deb, root / "tmp" / deb.name)
    _run([*chroot, "dpkg", "-i", f"/tmp/{deb.name}"], what="installing the .deb in the guest")
    (root / "tmp" / deb.name).unlink()
    log.info("built and installed %s", deb)
    return deb
