"""Staging trees (and firmware) for the simulated device's sample firmware.

A tiny Linux-like root filesystem whose only difference between two versions is what the test
asks for. The baseline is constant: the firmware version lives only inside the app directory,
so an app-only release diffs as app-only. Each name in ``changes`` makes one deliberate
difference outside the app (or native code inside it) — each one a reboot reason later:

=================  =======================================================================
change             what differs
=================  =======================================================================
``system-file``    ``/etc/sshfwup-sim.conf``
``kernel``         ``/boot/zImage``
``dtb``            ``/boot/sim.dtb``
``interpreter``    ``/usr/bin/python3``
``modules``        ``/lib/modules/6.1.0-sim/modules.dep``
``native-app``     adds ``/srv/app/_speedups.so`` (an ELF shared object)
``app-executable`` adds ``/srv/app/helper`` (an ELF executable)
=================  =======================================================================

The tree also holds what a device image would: the app's side of sshfwup (``sshfwup/__init__.py``,
``app.py``, ``handoff.py``: stdlib only) under ``/usr/lib/python3/dist-packages``, and a stand-in
``/usr/bin/python3`` that execs the host's Python by a fixed path (``HOST_INTERPRETERS``), so the
app runs from the mounted slot as its own user, wherever the checkout lives. Those library files
come from the checkout that builds the firmware: identical in every version built from it.

A changed file's content includes the version, so two releases that both carry the same change
also differ from each other there. Everything is deterministic: same inputs, same bytes, same
modes and timestamps, so unchanged files hash identically across versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "APP_LIBRARY",
    "CHANGES",
    "HOST_INTERPRETERS",
    "INTERPRETER",
    "SAMPLE_APP",
    "SITE_PACKAGES",
    "build_sample_firmware",
    "install_app_library",
    "make_rootfs",
]

SAMPLE_APP = Path(__file__).with_name("sample_app") / "app.py"
#: What an app imports of sshfwup (``from sshfwup.app import ...``): these files need only the
#: standard library, so a firmware vendors them as they are.
APP_LIBRARY = ("__init__.py", "app/__init__.py", "app/handoff.py")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
#: Where the firmware's Python finds them (Debian's directory for distribution packages).
SITE_PACKAGES = "/usr/lib/python3/dist-packages"
#: The firmware's interpreter (the stand-in below); the simulator's [app] command runs it.
INTERPRETER = "/usr/bin/python3"
#: The host interpreters the stand-in execs, first one the app's user may run. Fixed paths, never
#: this process's interpreter: the tree must not depend on who builds it (a pyenv or venv under
#: /root would also be out of the app user's reach).
HOST_INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")
KERNEL_RELEASE = "6.1.0-sim"
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: timestamps carry no information

CHANGES: dict[str, str] = {
    "system-file": "/etc/sshfwup-sim.conf",
    "kernel": "/boot/zImage",
    "dtb": "/boot/sim.dtb",
    "interpreter": "/usr/bin/python3",
    "modules": f"/lib/modules/{KERNEL_RELEASE}/modules.dep",
    "native-app": "/srv/app/_speedups.so",
    "app-executable": "/srv/app/helper",
}

_OS_RELEASE = """\
NAME="sshfwup simulated Linux"
ID=sshfwup-sim
PRETTY_NAME="sshfwup simulated Linux"
HOME_URL="https://example.invalid/sshfwup"
"""


def _blob(seed: str, size: int) -> bytes:
    """Deterministic filler bytes: a sha256 counter stream."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _elf(seed: str, elf_type: int, size: int = 4096) -> bytes:
    # ELF64 little-endian, x86-64 identification, e_type 2 (EXEC) or 3 (DYN); the rest is filler.
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + elf_type.to_bytes(2, "little") + (62).to_bytes(2, "little")
    return header + _blob(seed, size - len(header))


def _baseline(changed: set[str], version: str) -> dict[str, tuple[bytes, int]]:
    """Every file of the tree: path → (content, mode)."""

    def variant(change: str) -> str:
        return f"{change}:{version}" if change in changed else f"{change}:baseline"

    files: dict[str, tuple[bytes, int]] = {
        "/etc/os-release": (_OS_RELEASE.encode(), 0o644),
        "/etc/hostname": (b"sshfwup-sim\n", 0o644),
        "/etc/sshfwup-sim.conf": (f"# simulated system setting\nvariant = {variant('system-file')}\n".encode(), 0o644),
        "/boot/zImage": (b"SIMKERNEL" + _blob(variant("kernel"), 64 * 1024 - 9), 0o644),
        "/boot/sim.dtb": (bytes.fromhex("d00dfeed") + _blob(variant("dtb"), 4096 - 4), 0o644),
        f"/lib/modules/{KERNEL_RELEASE}/modules.dep": (
            f"kernel/drivers/sim/simdev.ko:\n# {variant('modules')}\n".encode(),
            0o644,
        ),
        INTERPRETER: (_stand_in_interpreter(variant("interpreter")), 0o755),
        "/usr/lib/python3.11/os.py": (b'"""stand-in for the standard library of the simulated rootfs"""\n', 0o644),
    }
    if "native-app" in changed:
        files["/srv/app/_speedups.so"] = (_elf(variant("native-app"), 3), 0o755)
    if "app-executable" in changed:
        files["/srv/app/helper"] = (_elf(variant("app-executable"), 2), 0o755)
    return files


def _stand_in_interpreter(variant: str) -> bytes:
    candidates = " ".join(HOST_INTERPRETERS)
    return (
        "#!/bin/sh\n"
        f"# stand-in interpreter ({variant}): the simulated device borrows the host's Python\n"
        f"for python in {candidates}; do\n"
        '    [ -x "$python" ] && exec "$python" "$@"\n'
        "done\n"
        f'echo "{INTERPRETER}: no host Python to run (tried {candidates}); apt-get install python3" >&2\n'
        "exit 127\n"
    ).encode()


def install_app_library(root: Path) -> Path:
    """Install the app's side of sshfwup (``APP_LIBRARY``) into the tree ``root``, under
    ``SITE_PACKAGES``, as a firmware build would; returns the package directory."""
    package = Path(root) / SITE_PACKAGES.lstrip("/") / "sshfwup"
    package.mkdir(parents=True, exist_ok=True)
    for name in APP_LIBRARY:
        target = package / name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes((_PACKAGE_DIR / name).read_bytes())
        os.chmod(target, 0o644)
    return package


def _write(dest: Path, path: str, content: bytes, mode: int) -> None:
    host = dest / path.lstrip("/")
    host.parent.mkdir(parents=True, exist_ok=True)
    host.write_bytes(content)
    os.chmod(host, mode)


def _normalize_tree(dest: Path) -> None:
    """Fixed directory modes and timestamps everywhere (umask and clock must not leak in)."""
    for dirpath, _, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
        os.utime(dirpath, (FIXED_MTIME, FIXED_MTIME))


def make_rootfs(
    dest: Path,
    *,
    version: str,
    hot: bool | None = True,
    changes: Iterable[str] = (),
    app_behavior: Mapping[str, Any] | None = None,
    manifest: bool = True,
    filler: int = 0,
) -> Path:
    """Build the staging tree at ``dest`` (replaced if it exists) and return it.

    ``hot`` is the HOT_RELOAD marker (None: no marker), ``changes`` the deliberate differences
    from the baseline (see the module doc), ``app_behavior`` the sample app's behavior.json,
    ``filler`` the size of an incompressible system file that is the same in every version
    (a bigger firmware for tests that need one).
    """
    from sshfwup.firmware.manifest import build_manifest, write_manifest, write_marker

    changed = set(changes)
    unknown = changed - set(CHANGES)
    if unknown:
        raise ValueError(f"unknown rootfs change {sorted(unknown)[0]!r} (known: {', '.join(CHANGES)})")
    if not version or "\n" in version:
        raise ValueError(f"invalid version {version!r}")
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)

    for path, (content, mode) in sorted(_baseline(changed, version).items()):
        _write(dest, path, content, mode)
    install_app_library(dest)
    if filler:
        _write(dest, "/usr/share/sshfwup-sim/filler.bin", _blob("filler", filler), 0o644)
    _write(dest, "/srv/app/app.py", SAMPLE_APP.read_bytes(), 0o644)
    _write(dest, "/srv/app/VERSION", f"{version}\n".encode(), 0o644)
    behavior = json.dumps(dict(app_behavior or {}), sort_keys=True, indent=2) + "\n"
    _write(dest, "/srv/app/behavior.json", behavior.encode(), 0o644)
    (dest / "usr/share/sshfwup").mkdir(parents=True, exist_ok=True)  # the manifest's home
    _normalize_tree(dest)

    if hot is not None:
        write_marker(dest, hot)
    if manifest:
        built = build_manifest(dest, app_dirs=["/srv/app"], kernel="/boot/zImage", dtbs=["/boot/sim.dtb"])
        write_manifest(dest, built)
    _normalize_tree(dest)
    return dest


def build_sample_firmware(
    workdir: Path,
    *,
    version: str,
    name: str | None = None,
    platform: str | None = None,
    conf: Path | None = None,
    **rootfs_kwargs: Any,
) -> Path:
    """``make_rootfs`` + ``build_firmware``: ``workdir/<name>.fw`` (name defaults to the version).
    ``conf``: a layout's fwup.conf (deploy/examples/*/fwup.conf) instead of the simulator's."""
    from sshfwup.sim.firmware import build_firmware
    from sshfwup.sim.layouts import placeholder_variables

    name = name or version
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    staging = make_rootfs(workdir / f"{name}.rootfs", version=version, **rootfs_kwargs)
    variables = placeholder_variables(Path(conf), workdir / f"{name}.files") if conf is not None else None
    return build_firmware(staging, workdir / f"{name}.fw", version=version, platform=platform, conf=conf,
                          variables=variables)  # fmt: skip
