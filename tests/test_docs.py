"""The docs say what the repository has: no file, marker or key that does not exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

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


def test_keys_readme_names_only_the_keys_the_demo_makes() -> None:
    text = (ROOT / "keys" / "README.md").read_text()
    demo = (ROOT / "sshfwup" / "host" / "demo.py").read_text()
    assert '"keys" / "dev" / "id_ed25519"' in demo
    named = set(re.findall(r"`(dev/[^`]+)`", text))
    assert named <= {"dev/", "dev/id_ed25519", "dev/id_ed25519.pub"}, named


@pytest.mark.parametrize("path", ["deploy/sshfwup.toml", "docs/ARCHITECTURE.md", "docs/deploying.md", "keys/README.md"])
def test_no_project_history_jargon(path: str) -> None:
    assert "seed PoC" not in (ROOT / path).read_text()
