"""The collection's static checks that run anywhere: ansible-test's sanity tests that need no
extra virtual environment, ansible-doc on every module, and each module's documented options
against the argument spec its action plugin validates (validate-modules' core rule).

The full ``ansible-test sanity`` (pylint, pep8, validate-modules, yamllint, import) installs
pinned tools into virtual environments of its own; docs/fleets.md says how to run it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from printed_warnings import without_warnings_of

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible_collections" / "sshfwup" / "device"
MODULES = sorted((COLLECTION / "plugins" / "modules").glob("*.py"))
LOCAL_SANITY_TESTS = (
    "action-plugin-docs", "compile", "empty-init", "ignores", "line-endings", "no-assert", "no-get-exception",
    "no-illegal-filenames", "no-smart-quotes", "replace-urlopen", "shebang", "symlinks", "use-argspec-type-path",
    "use-compat-six",
)  # fmt: skip


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} not found: install the test extra (it has ansible-core)")
    return str(path)


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(REPO), ANSIBLE_HOME=str(tmp_path / "ansible-home"),
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")  # fmt: skip


def test_ansible_test_sanity_local_tests(tmp_path: Path) -> None:
    tests = [arg for name in LOCAL_SANITY_TESTS for arg in ("--test", name)]
    result = subprocess.run(
        [_tool("ansible-test"), "sanity", "--python", f"{sys.version_info.major}.{sys.version_info.minor}", *tests],
        cwd=COLLECTION, capture_output=True, text=True, timeout=300, check=False,
        env={**_env(tmp_path), "HOME": str(tmp_path)},  # its virtual environments go under ~/.ansible/test
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Running sanity test") == len(LOCAL_SANITY_TESTS), result.stdout


def test_ansible_doc_reads_every_module(tmp_path: Path) -> None:
    names = [f"sshfwup.device.{m.stem}" for m in MODULES]
    assert names == ["sshfwup.device.firmware_facts", "sshfwup.device.firmware_update", "sshfwup.device.reboot"]
    result = subprocess.run([_tool("ansible-doc"), "--json", "-t", "module", *names], capture_output=True, text=True,
                            env=_env(tmp_path), timeout=120, check=False)  # fmt: skip
    # ansible-core's own start-up warning (tests/test_dependency_warnings.py) is not about the docs
    import ansible

    assert result.returncode == 0 and not without_warnings_of(result.stderr, str(Path(ansible.__file__).parent)).strip(), (
        result.stderr
    )
    import json

    docs = json.loads(result.stdout)
    assert set(docs) == set(names)
    assert "firmware" in docs["sshfwup.device.firmware_update"]["doc"]["options"]


def _constants(body: list[ast.stmt]) -> dict[str, Any]:
    return {n.targets[0].id: n.value.value for n in body if isinstance(n, ast.Assign)
            and isinstance(n.targets[0], ast.Name) and isinstance(n.value, ast.Constant)}  # fmt: skip


def _fragment_options(name: str) -> dict[str, Any]:
    """The options of doc fragment ``sshfwup.device.<name>`` (its ModuleDocFragment.DOCUMENTATION)."""
    namespace, collection, fragment = name.split(".")
    assert (namespace, collection) == ("sshfwup", "device"), name
    tree = ast.parse((COLLECTION / "plugins" / "doc_fragments" / f"{fragment}.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ModuleDocFragment"]
    return yaml.safe_load(_constants(cls.body)["DOCUMENTATION"]).get("options", {})


def _module_docs(path: Path) -> dict[str, Any]:
    """DOCUMENTATION (with its doc fragments' options merged in, as Ansible does), EXAMPLES, RETURN."""
    found = _constants(ast.parse(path.read_text()).body)
    assert {"DOCUMENTATION", "EXAMPLES", "RETURN"} <= set(found), path
    docs = {k: yaml.safe_load(found[k]) for k in ("DOCUMENTATION", "EXAMPLES", "RETURN")}
    for fragment in docs["DOCUMENTATION"].get("extends_documentation_fragment", []):
        shared = _fragment_options(fragment)
        assert not set(shared) & set(docs["DOCUMENTATION"]["options"]), (path, fragment)
        docs["DOCUMENTATION"]["options"].update(shared)
    return docs


@pytest.mark.parametrize("module", MODULES, ids=lambda p: p.stem)
def test_documented_options_match_the_argument_spec(module: Path) -> None:
    sys.path.insert(0, str(REPO))
    try:
        from ansible_collections.sshfwup.device.plugins.module_utils import args
    finally:
        sys.path.remove(str(REPO))
    spec = {"firmware_update": args.FIRMWARE_UPDATE_ARGS, "firmware_facts": args.FIRMWARE_FACTS_ARGS,
            "reboot": args.REBOOT_ARGS}[module.stem]  # fmt: skip
    options = _module_docs(module)["DOCUMENTATION"]["options"]
    assert set(options) == set(spec), module.stem
    for name, arg in spec.items():
        doc = options[name]
        assert doc.get("type") == arg.get("type"), name
        assert doc.get("default") == arg.get("default"), name
        assert bool(doc.get("required")) == bool(arg.get("required")), name
        assert doc.get("description"), name
    for example in _module_docs(module)["EXAMPLES"]:
        used = example.get(f"sshfwup.device.{module.stem}") or {}
        assert set(used) <= set(spec), example


def test_the_playbook_finds_the_collection_from_any_directory(tmp_path: Path) -> None:
    """`ansible-playbook -i INVENTORY deploy/ansible/rollout.yml` from the repository's root (or
    anywhere): the collection is found next to the playbook (deploy/ansible/collections), not only
    through deploy/ansible/ansible.cfg, which applies only when run from that directory."""
    inventory = tmp_path / "inventory.yml"
    inventory.write_text((REPO / "deploy" / "ansible" / "inventory.example.yml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(HOME=str(tmp_path), ANSIBLE_HOME=str(tmp_path / "ansible-home"))
    for cwd in (REPO, tmp_path):
        playbook = (REPO / "deploy" / "ansible" / "rollout.yml").relative_to(REPO) if cwd == REPO else \
            REPO / "deploy" / "ansible" / "rollout.yml"  # fmt: skip
        result = subprocess.run([_tool("ansible-playbook"), "-i", str(inventory), str(playbook), "--syntax-check"],
                                cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert result.returncode == 0 and "couldn't resolve" not in result.stderr, (cwd, result.stdout + result.stderr)
