"""requirements-lock.txt: what bootstrap installs (issue 19: a fresh machine gets what CI tested).

The lock must name every dependency pyproject.toml declares (runtime, every extra, the build
backend) at a version its range allows, with hashes; and the venv the suite runs in must hold
exactly the locked versions — otherwise bootstrap did not install the lock, and a green run here
says nothing about a fresh machine.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"

# "name==version ; marker \" then "--hash=sha256:..." lines
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+)(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$")


def locked() -> dict[str, list[tuple[Version, Marker | None, int]]]:
    """name → [(version, marker, number of hashes)] (a name may be pinned per Python version)."""
    pins: dict[str, list[tuple[Version, Marker | None, int]]] = {}
    current: tuple[str, Version, Marker | None] | None = None
    hashes = 0

    def close() -> None:
        if current is not None:
            pins.setdefault(current[0], []).append((current[1], current[2], hashes))

    for line in LOCK.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            close()
            marker = Marker(match["marker"]) if match["marker"] else None
            current, hashes = (canonicalize_name(match["name"]), Version(match["version"]), marker), 0
        elif line.strip().startswith("--hash=sha256:"):
            hashes += 1
    close()
    return pins


def declared() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for extra in project["project"]["optional-dependencies"].values():
        requirements += extra
    return [Requirement(r) for r in requirements]


def for_this_python(entries: list[tuple[Version, Marker | None, int]]) -> list[Version]:
    return [version for version, marker, _ in entries if marker is None or marker.evaluate()]


def test_every_pin_has_hashes() -> None:
    pins = locked()
    assert len(pins) > 10, f"{LOCK} names only {sorted(pins)}"
    unhashed = [name for name, entries in pins.items() for _, _, hashes in entries if hashes == 0]
    assert not unhashed, f"pins without --hash in {LOCK.name} (pip --require-hashes refuses them): {unhashed}"


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_lock_satisfies_pyproject(requirement: Requirement) -> None:
    pins = locked()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement} is declared in pyproject.toml but not locked: run ./scripts/lock.sh"
    versions = for_this_python(pins[name])
    assert versions, f"{name}: no pin applies to Python {sys.version.split()[0]}"
    for version in versions:
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} in {LOCK.name} is outside pyproject.toml's {requirement}: run ./scripts/lock.sh"
        )


def test_the_suite_runs_on_exactly_the_lock() -> None:
    pins = {name: for_this_python(entries) for name, entries in locked().items()}
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in distributions()}
    wrong = {
        name: f"locked {versions[0]}, installed {installed.get(name, 'nothing')}"
        for name, versions in pins.items()
        if versions and installed.get(name) != versions[0]
    }
    unlocked = sorted(set(installed) - set(pins) - {"pip", "sshfwup"})
    assert not wrong, f"this venv is not the lock (run ./scripts/bootstrap.sh): {wrong}"
    assert not unlocked, f"installed but not locked (bootstrap removes these): {unlocked}"


def test_bootstrap_shows_pip_and_setuptools_chatter_only_on_failure(tmp_path: Path) -> None:
    """The demo runs bootstrap first: setuptools' editable-install banner (and pip's notices) must
    not reach its screen; on a failure they are the explanation and are shown."""
    import subprocess

    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    calls = [line for line in script.splitlines() if re.search(r"-m pip\b", line) and not line.lstrip().startswith("#")]
    assert calls and all("pip_quiet" in line or 'out=$("$venv/bin/python" -m pip "$@" 2>&1)' in line for line in calls), calls
    assert not re.search(r"\bpip\b", (ROOT / "scripts" / "demo.sh").read_text())
    function = re.search(r"^  pip_quiet\(\) \{.*?^  \}$", script, re.S | re.M)
    assert function is not None
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"  # a pip that talks like setuptools' editable build, then exits $STATUS
    fake.write_text('#!/bin/sh\necho "Editable install will be performed using a meta path finder."\n'
                    'echo "******** setuptools notice ********" >&2\nexit "$STATUS"\n')  # fmt: skip
    fake.chmod(0o755)
    for status, shown in ((0, False), (1, True)):
        shell = f'set -eu\nvenv={venv}\n{function.group(0)}\npip_quiet install -e . || exit 7\n'
        result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env={"STATUS": str(status), "PATH": "/usr/bin:/bin"})
        assert result.returncode == (7 if status else 0), result
        assert result.stdout == "", result.stdout
        assert ("Editable install" in result.stderr and "setuptools notice" in result.stderr) == shown, result.stderr
        assert shown or result.stderr == "", result.stderr
