"""``sshfwup sim create --contract``: the device's bootloader and its server speak the same contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sshfwup.sim import cli
from sshfwup.sim.bootloader import FACTORY_ENV, choose_boot, choose_for, choose_nerves


class Created:
    path = Path("/nonexistent")
    ssh_port = 2222
    app_port = 8080
    server_data_dir = Path("/nonexistent/data")


def created_with(argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """What `sshfwup sim create ... ARGV` hands SimDevice.create (which is not run)."""
    seen: dict[str, Any] = {}

    def create(path: Path, **kwargs: Any) -> Created:
        seen.update(kwargs)
        return Created()

    monkeypatch.setattr(cli.SimDevice, "create", create)
    fw = tmp_path / "x.fw"
    fw.write_bytes(b"")
    assert cli.main(["create", str(tmp_path / "d"), "--firmware", str(fw), *argv]) == 0
    return seen


@pytest.mark.parametrize(("argv", "overrides"), [
    ([], None),
    (["--contract", "uboot-bootcount"], None),
    (["--contract", "uboot-nerves"], {"boot": {"contract": "uboot-nerves"}}),
])  # fmt: skip
def test_create_passes_the_contract_to_the_device(
    argv: list[str], overrides: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = created_with(argv, monkeypatch, tmp_path)
    assert seen["config_overrides"] == overrides


def test_create_refuses_an_unknown_contract(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["create", "d", "--contract", "grub"])
    assert "invalid choice: 'grub'" in capsys.readouterr().err


def test_each_contract_has_a_bootloader_and_a_factory_env() -> None:
    assert choose_for("uboot-bootcount") is choose_boot and choose_for("uboot-nerves") is choose_nerves
    assert FACTORY_ENV["uboot-nerves"] == {"nerves_fw_autovalidate": "0"}
    with pytest.raises(ValueError, match="no bootloader for boot contract 'tryboot'"):
        choose_for("tryboot")


def test_create_help_documents_the_contract(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["create", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--contract {uboot-bootcount,uboot-nerves,fwup-ops}" in text and "nerves_fw_autovalidate=0" in text
    assert "--layout NAME|DIR" in text and "--fwup-conf FILE" in text and "--ops-conf FILE" in text


EXAMPLES = Path(__file__).resolve().parents[2] / "deploy/examples"


@pytest.mark.parametrize("argv", [["--layout", "tryboot-like"], ["--contract", "fwup-ops"],
                                  ["--layout", str(EXAMPLES / "tryboot-like"), "--contract", "fwup-ops"]])  # fmt: skip
def test_a_layout_brings_its_boot_section_and_ops_archive(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = created_with(argv, monkeypatch, tmp_path)
    boot = seen["config_overrides"]["boot"]
    assert boot["contract"] == "fwup-ops" and boot["validate_task"] == "validate.{slot}"
    assert "ops_archive" not in boot  # a device path: the simulator sets its own
    assert seen["ops_conf"] == EXAMPLES / "tryboot-like" / "ops.conf"


def test_a_contract_the_layout_does_not_speak_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fw = tmp_path / "x.fw"
    fw.write_bytes(b"")
    argv = ["create", str(tmp_path / "d"), "--firmware", str(fw), "--layout", "tryboot-like", "--contract", "uboot-nerves"]
    assert cli.main(argv) != 0
    assert "layout tryboot-like's sshfwup.toml says contract = 'fwup-ops'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_an_unknown_layout_names_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["create", str(tmp_path / "d"), "--layout", "rpi9"]) != 0
    err = capsys.readouterr().err
    assert "layout 'rpi9'" in err and "tryboot-like" in err and "nerves-bbb-like" in err
