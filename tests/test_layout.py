"""The package layout's rules (issue 21): which package may import which, no import circles, sizes.

The tree follows the bytes: ``ssh`` (the front) → ``update`` (one update) → ``boot`` (boot state) and
``supervisor`` (the app's lifecycle); ``firmware`` holds the formats the device and the build
machine share, ``app`` what an application imports, ``host`` the build machine and the operator,
``sim`` the simulated device. Every import counts — at module level, inside a function, under
``TYPE_CHECKING`` — because a lazy import is still a dependency someone must keep working.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEVICE_SIDE = ("sshfwup.ssh", "sshfwup.update", "sshfwup.boot", "sshfwup.supervisor")
#: Module and class sizes (lines) a part should stay within; docs/ARCHITECTURE.md names each
#: exception with its reason, under "Sizes".
MODULE_LINES = 500
CLASS_LINES = 300
TOLERANCE = 1.1  # "about": a bound, not a line count to game


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path) -> dict[str, Path]:
    """Every module of the sshfwup package under ``root`` (the sample app is an app, not sshfwup)."""
    return {module_name(root, p): p for p in (root / "sshfwup").rglob("*.py") if "sample_app" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """What ``path`` imports, absolute names; ``from pkg import module`` counts as that module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                whole = f"{source}.{alias.name}"
                found.append(Import(name, whole if whole in known else source, node.lineno))
    return found


def import_graph(root: Path) -> dict[str, list[Import]]:
    modules = package_modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(graph: dict[str, list[Import]]) -> list[str]:
    """Every import that breaks a rule of the layout, as a line an author can act on."""
    found = []
    for module, imports in graph.items():
        for imp in imports:
            where = f"{module}:{imp.line} imports {imp.imported}"
            if any(within(module, p) for p in DEVICE_SIDE) and (
                within(imp.imported, "sshfwup.host") or within(imp.imported, "sshfwup.sim")
            ):
                found.append(f"{where}: the device side never imports the host's or the simulator's code")
            if within(module, "sshfwup.app"):
                top = imp.imported.partition(".")[0]
                if not within(imp.imported, "sshfwup.app") and top not in sys.stdlib_module_names:
                    found.append(f"{where}: an application imports sshfwup.app, which needs only the standard library")
            if within(module, "sshfwup.firmware") and any(
                within(imp.imported, p) for p in ("sshfwup.ssh", "sshfwup.update", "sshfwup.supervisor")
            ):
                found.append(f"{where}: firmware formats are shared with the host and know nothing of the device's server")
    return sorted(found)


def circles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Groups of modules that import each other, however indirectly (Tarjan's strongly connected components)."""
    edges = {m: sorted({i.imported for i in imps if i.imported in graph and i.imported != m}) for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                result.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(result)


def test_the_packages_keep_their_rules() -> None:
    assert violations(import_graph(REPO)) == []


def test_no_import_circles() -> None:
    assert circles(import_graph(REPO)) == []


@pytest.fixture
def planted_tree(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "sshfwup", tmp_path / "sshfwup", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


@pytest.mark.parametrize(
    "module, planted, rule",
    [
        ("ssh/server.py", "from sshfwup.host import client", "never imports the host's"),
        ("update/pipeline.py", "    from sshfwup.sim import machine", "never imports the host's"),  # lazy import
        ("supervisor/room.py", "import sshfwup.sim.device", "never imports the host's"),
        ("boot/slots.py", "from ..host.firmware_build import build_release", "never imports the host's"),
        ("app/handoff.py", "import anyio", "needs only the standard library"),
        ("app/__init__.py", "from sshfwup.system import procs", "needs only the standard library"),
        ("firmware/manifest.py", "from sshfwup.update.lock import DeviceLock", "know nothing of the device's server"),
    ],
)
def test_the_rules_catch_a_planted_import(planted_tree: Path, module: str, planted: str, rule: str) -> None:
    """Each rule fails on an import planted in a copy of the package (a check that cannot fail protects nothing)."""
    path = planted_tree / "sshfwup" / module
    statement = f"def _planted() -> None:\n{planted}\n" if planted.startswith(" ") else f"{planted}\n"
    path.write_text(path.read_text() + "\n\n" + statement)
    found = violations(import_graph(planted_tree))
    assert len(found) == 1 and rule in found[0] and module_name(planted_tree, path) in found[0], found


def test_a_planted_circle_is_found(planted_tree: Path) -> None:
    path = planted_tree / "sshfwup" / "update" / "lock.py"
    path.write_text(path.read_text() + "\n\nfrom sshfwup.update import update  # planted\n")
    assert any({"sshfwup.update.lock", "sshfwup.update.update"} <= set(group) for group in circles(import_graph(planted_tree)))


def size_exceptions() -> dict[str, str]:
    """docs/ARCHITECTURE.md's "Sizes" list: ``- `sshfwup/x.py` ...: reason`` (modules) and ``- `Class` ...``."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("\n## Sizes\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^- `([^`]+)`[^:]*: (.+)$", section, flags=re.M))


def oversized(root: Path) -> list[str]:
    found = []
    for name, path in package_modules(root).items():
        rel = path.relative_to(root).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MODULE_LINES * TOLERANCE:
            found.append(f"`{rel}` {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                if length > CLASS_LINES * TOLERANCE:
                    found.append(f"`{name}.{node.name}` {length} lines")
    return sorted(found)


def test_modules_and_classes_stay_small_or_are_named_with_a_reason() -> None:
    exceptions = size_exceptions()
    unexplained = [item for item in oversized(REPO) if item.split("`")[1] not in exceptions]
    assert unexplained == [], "split these, or name them under docs/ARCHITECTURE.md's \"Sizes\" with the reason"
    stale = [name for name in exceptions if not any(item.split("`")[1] == name for item in oversized(REPO))]
    assert stale == [], "docs/ARCHITECTURE.md names exceptions that are no longer oversized"
