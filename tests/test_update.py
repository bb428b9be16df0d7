"""update.Update through a simulated device: what the upload says it is, read before fwup runs."""

from __future__ import annotations

import json

from conftest import Sim, assert_applied, assert_untouched, output

from sshfwup.fwhead import read_head_bytes, version_key


async def test_the_firmware_already_running_changes_nothing(sim: Sim, firmware) -> None:
    v1 = firmware("1.0.0")  # the device was flashed with this very file
    for upload in (lambda: sim.upload(v1), lambda: sim.scp(v1), lambda: sim.scp(v1, legacy=True)):
        result = upload()
        text = output(result)
        assert result.returncode == 0, text
        assert "already running 1.0.0" in text and "nothing changed" in text, text
        assert "\nfwup:" not in text and "Success!" not in text  # fwup never ran
        assert_untouched(sim)
        status = sim.status()
        assert not status["pending_reboot"] and status["last_update"]["ok"]
    record = json.loads((sim.device.server_data_dir / "journal.json").read_text())
    assert record["stage"] == "unchanged" and record["to_version"] == "1.0.0"
    assert_applied(sim, sim.upload(firmware("2.0.0")))  # a real update still goes through


async def test_a_rebuilt_same_version_is_a_different_firmware(sim: Sim, firmware) -> None:
    """Same version string, different build (uuid): not skipped."""
    other = firmware("1.0.0", app_behavior={"note": "rebuilt"})
    result = sim.upload(other)
    assert result.returncode == 0, output(result)
    assert "already running" not in output(result) and "Success!" in output(result)


def test_the_head_is_read_from_the_first_bytes(firmware) -> None:
    data = firmware("1.0.0").read_bytes()
    head = read_head_bytes(data[:4096])
    assert head is not None and head.version == "1.0.0" and head.platform == "sshfwup-sim"
    assert [name for name, _, _ in head.resources] == ["rootfs.img"]
    assert read_head_bytes(data[:100]) is None  # not there yet
    assert read_head_bytes(b"PK\x03\x04" + bytes(500), final=True) is None


async def test_a_downgrade_is_refused_unless_allowed(sim: Sim, firmware) -> None:
    old = firmware("0.9.0")
    result = sim.upload(old)
    text = output(result)
    assert result.returncode == 1 and "0.9.0 is older than the running 1.0.0 (a downgrade)" in text, text
    assert "allow_downgrade" in text and "Success!" not in text
    assert_untouched(sim)
    assert "b.sshfwup_state" not in sim.env()  # refused before fwup saw a byte
    await sim.restart_server(update={"allow_downgrade": True})
    result = sim.upload(old)
    assert result.returncode == 0 and "downgrade to 0.9.0: hot reload" in output(result), output(result)
    assert sim.app()["version"] == "0.9.0"


def test_versions_compare_number_by_number() -> None:
    assert version_key("1.10.0") > version_key("1.9.2") > version_key("1.9")
    assert version_key("2.0.0") == version_key("2.0.0")
