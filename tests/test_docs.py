"""The docs say what the repository has: no file, marker or key that does not exist."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest
from conftest import Sim

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_cites_nothing_missing() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    markers = {m.split(":")[0] for m in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
    for named in re.findall(r"Tests marked `([a-z_]+)`", text):
        assert named in markers, f"ARCHITECTURE.md names a marker {named!r}; pytest knows {sorted(markers)}"
    for doc in re.findall(r"`([A-Za-z_/.-]+\.md)`", text):
        assert (ROOT / doc).exists() or (ROOT / "docs" / doc).exists(), f"ARCHITECTURE.md cites {doc}, not in the repository"
    # the simulator's files: each one is named in the code that makes it
    sim = "".join(p.read_text() for p in (ROOT / "sshfwup" / "sim").glob("*.py"))
    for name in re.findall(r"^D/([a-z_.]+)", text, flags=re.M):
        assert f'"{name}"' in sim or f"/ \"{name}\"" in sim or f"'{name}'" in sim or f"{name}\"" in sim, name



def package_files() -> set[str]:
    """Every module of the package as the module map names it (relative to sshfwup/): a package's
    ``__init__.py`` only where it holds code (``app/``; a docstring alone is the package's heading
    in the map), ``__main__.py`` never."""
    package = ROOT / "sshfwup"
    files = set()
    for path in package.rglob("*.py"):
        body = ast.parse(path.read_text()).body
        docstring_only = len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        if path.name == "__main__.py" or (path.name == "__init__.py" and (not body or docstring_only)):
            continue
        files.add(path.relative_to(package).as_posix())
    return files


def test_the_module_map_names_every_module_once() -> None:
    """docs/ARCHITECTURE.md's module map follows the tree: one row per module, none missing, none extra."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_/]+\.py)` \|", section, flags=re.M)
    assert len(rows) == len(set(rows)), [row for row in rows if rows.count(row) > 1]
    assert set(rows) == package_files(), {"missing": sorted(package_files() - set(rows)), "extra": sorted(set(rows) - package_files())}


DOCS = ["README.md", "bench/README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCS)
def test_docs_name_only_python_files_that_exist(path: str) -> None:
    """A `name.py` in the docs is a file of this repository: under the root, sshfwup/, tests/ or bench/."""
    text = (ROOT / path).read_text()
    named = {m for m in re.findall(r"`([A-Za-z0-9_./-]+\.py)(?:::[A-Za-z0-9_.]+)?`", text) if not m.startswith("/")}
    missing = [name for name in sorted(named) if not any((ROOT / base / name).exists() for base in ("", "sshfwup", "tests", "bench"))]
    assert missing == [], f"{path} names Python files that are not in the repository"

def test_keys_readme_names_only_the_keys_the_demo_makes() -> None:
    text = (ROOT / "keys" / "README.md").read_text()
    demo = (ROOT / "sshfwup" / "host" / "demo.py").read_text()
    assert '"keys" / "dev" / "id_ed25519"' in demo
    named = set(re.findall(r"`(dev/[^`]+)`", text))
    assert named <= {"dev/", "dev/id_ed25519", "dev/id_ed25519.pub"}, named


@pytest.mark.parametrize("path", ["deploy/sshfwup.toml", "docs/ARCHITECTURE.md", "docs/deploying.md", "keys/README.md"])
def test_no_project_history_jargon(path: str) -> None:
    assert "seed PoC" not in (ROOT / path).read_text()


# --- the README's firmware build hot-swaps --------------------------------------------------------------


def _readme_build_line() -> list[str]:
    """The README's ``sshfwup firmware build rootfs/ …`` example, as argv (comment dropped)."""
    import shlex

    text = (ROOT / "README.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("sshfwup firmware build rootfs/ "))
    return shlex.split(line.split("#", 1)[0])


async def test_the_readme_firmware_build_hot_swaps_on_a_simulated_device(tmp_path: Path, fwup: str, client_key) -> None:
    """Two releases built the README's way (the sample firmware's tree, no --kernel/--dtb):
    the device hot-swaps the second."""
    import subprocess
    import sys

    import anyio

    from sshfwup.sim.device import SimDevice, cleanup
    from sshfwup.sim.host import free_port
    from sshfwup.sim.machine import SimMachine
    from sshfwup.sim.rootfs import make_rootfs

    argv = _readme_build_line()
    assert argv[:4] == ["sshfwup", "firmware", "build", "rootfs/"] and "--hot" in argv, argv
    old_out, old_version = argv[argv.index("-o") + 1], argv[argv.index("--version") + 1]

    def build(version: str) -> Path:
        tree = make_rootfs(tmp_path / f"rootfs-{version}", version=version, hot=None, manifest=False)
        out = tmp_path / f"app-{version}.fw"
        args = [str(tree) if a == "rootfs/" else str(out) if a == old_out else version if a == old_version else a
                for a in argv[1:]]  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "sshfwup", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stderr == "", result.stdout + result.stderr
        assert f"found in {tree}: kernel /boot/zImage; device tree /boot/sim.dtb" in result.stdout, result.stdout
        return out

    v1, v2 = build("1.0.0"), build("2.0.0")
    path = tmp_path / "device"
    try:
        device = SimDevice.create(path, firmware=v1, fwup=fwup, authorized_keys=[client_key.public_line],
                                  ssh_port=free_port(), app_port=free_port(),
                                  config_overrides={"app": {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}})  # fmt: skip
        async with SimMachine.start(device.path) as machine:
            await machine.wait_up(timeout=60)
            sim = Sim(device, machine, client_key)
            result = await anyio.to_thread.run_sync(lambda: sim.upload(v2))
            text = (result.stdout + result.stderr).decode()
            assert result.returncode == 0 and "hot reload: 1.0.0 → 2.0.0" in text, text
            assert sim.app()["version"] == "2.0.0"
    finally:
        cleanup(path)
