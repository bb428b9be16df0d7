"""The boot contract is the one seam: no module outside sshfwup/boot/ (and sshfwup/sim/, which
plays the bootloader) names a bootloader variable; ``[boot] contract`` picks the backend."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import sshfwup
from sshfwup.boot.backends import CONTRACTS, UnknownContract, make_contract
from sshfwup.boot.bootenv import BootEnv
from sshfwup.boot.fwup_ops import FwupOps
from sshfwup.boot.uboot_bootcount import UBootBootcount
from sshfwup.boot.uboot_nerves import UBootNerves
from sshfwup.config import Config, ConfigError, parse_config
from sshfwup.device import Device

PACKAGE = Path(sshfwup.__file__).parent
ALLOWED = ("boot", "sim")  # the seam's backends, and the simulated bootloader
BOOT_KEYS = sorted({*UBootBootcount.boot_keys, *UBootNerves.boot_keys, *FwupOps.boot_keys})
# A key as a whole name: "uboot-bootcount" (a contract's name) is not the variable bootcount.
KEY = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, BOOT_KEYS)) + r")(?![\w-])")


def boot_key_references(package: Path) -> list[str]:
    """Every string constant or name naming a boot key in modules outside boot/ and sim/."""
    found: list[tuple[str, int, str]] = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] in ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, ast.Attribute):
                text = node.attr
            else:
                continue
            for match in KEY.finditer(text):
                found.append((str(rel), node.lineno, match.group(1)))
    return [f"{rel}:{line}: {key}" for rel, line, key in sorted(found)]


def test_the_keys_cover_both_contracts() -> None:
    for key in ("nerves_fw_active", "nerves_fw_validated", "nerves_fw_booted", "nerves_fw_autovalidate",
                "upgrade_available", "bootcount", "bootlimit"):  # fmt: skip
        assert key in BOOT_KEYS


def test_no_module_outside_boot_names_a_boot_key() -> None:
    assert boot_key_references(PACKAGE) == []


def test_a_planted_reference_is_found(tmp_path: Path) -> None:
    for rel in ("boot/ok.py", "sim/ok.py", "update/planted.py", "cli.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "boot/ok.py").write_text('X = "nerves_fw_active"\n')
    (tmp_path / "sim/ok.py").write_text('X = {"bootcount": "0"}\n')
    (tmp_path / "update/planted.py").write_text(
        'async def f(env):\n    await env.write({"nerves_fw_validated": "1"})\n    return f"{env}.upgrade_available"\n'
    )
    (tmp_path / "cli.py").write_text('CONTRACT = "uboot-bootcount"  # a name, not the variable\n')
    assert boot_key_references(tmp_path) == [
        "update/planted.py:2: nerves_fw_validated",
        "update/planted.py:3: upgrade_available",
    ]


# --- choosing the backend ------------------------------------------------------------------


def test_default_contract_is_bootcount() -> None:
    assert Config().boot.contract == "uboot-bootcount"
    assert isinstance(Device(Config()).bootenv, UBootBootcount)


def test_config_picks_the_nerves_backend() -> None:
    config = parse_config({"boot": {"contract": "uboot-nerves"}, "app": {"command": ["app"]}})
    contract = Device(config).bootenv
    assert isinstance(contract, UBootNerves) and contract.health_gated


def test_unknown_contract_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"boot": {"contract": "grub"}})
    assert "[boot] contract" in str(e.value) and "'grub'" in str(e.value)
    assert all(name in str(e.value) for name in CONTRACTS)


def test_unknown_contract_by_name(tmp_path: Path) -> None:
    with pytest.raises(UnknownContract, match="known: uboot-bootcount, uboot-nerves"):
        make_contract("tryboot", BootEnv(tmp_path / "fw_env.config"))


def test_deploy_config_documents_the_key() -> None:
    text = (PACKAGE.parent / "deploy/sshfwup.toml").read_text()
    assert '[boot]\n' in text and 'contract = "uboot-bootcount"' in text
