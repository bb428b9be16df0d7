"""The docs say what the repository has: no file, marker or key that does not exist."""

from __future__ import annotations

import ast
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
