"""sshfwup.host.fleet without a device: request checks, what counts as installed, refusals, the
prediction from released firmware, and reading the device's own verdict lines. (With devices
and the real ansible-playbook: tests/host/test_ansible_rollout.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import FirmwareFactory
from sshfwup.host.fleet import (
    FleetError,
    check_request,
    installed,
    predict,
    read_firmware_head,
    refusal,
    verdict_from_lines,
)


def status(**changes: Any) -> dict[str, Any]:
    """A settled, validated device running 1.0.0 (uuid u1) from slot a; slot b empty."""
    base: dict[str, Any] = {
        "running_root": "a", "active": "a", "validated": True, "pending_reboot": False,
        "slots": {"a": {"version": "1.0.0", "uuid": "u1"}, "b": {"version": None, "uuid": None}},
        "running_uuid": "u1", "boot_env_error": None, "update_in_progress": False, "rebooting": None,
        "app": {"version": "1.0.0", "slot": "a", "pid": 10},
    }  # fmt: skip
    base.update(changes)
    return base


HOT_SWAPPED = status(active="b", validated=False, pending_reboot=True, app={"version": "2.0.0", "slot": "b"},
                     slots={"a": {"version": "1.0.0", "uuid": "u1"}, "b": {"version": "2.0.0", "uuid": "u2"}})  # fmt: skip


def test_check_request_names_each_bad_input(tmp_path: Path) -> None:
    fw = tmp_path / "app.fw"
    fw.write_bytes(b"x")
    assert check_request(fw, port=22) is None
    assert "is a directory" in (check_request(tmp_path, port=22) or "")
    assert "no such file" in (check_request(tmp_path / "gone.fw", port=22) or "")
    assert "a port is 1..65535" in (check_request(fw, port=0) or "")
    assert "a port is 1..65535" in (check_request(fw, port=70000) or "")
    assert "more than 0 seconds" in (check_request(fw, port=22, timeout=0) or "")
    assert "releases" in (check_request(fw, port=22, releases=tmp_path / "none") or "")
    assert "delta_from" in (check_request(fw, port=22, delta_from=fw) or "")
    assert "known_hosts" in (check_request(fw, port=22, known_hosts=str(tmp_path / "kh")) or "")
    assert "identity file" in (check_request(fw, port=22, identities=(str(tmp_path / "id"),)) or "")
    assert "not a usable private key" in (check_request(fw, port=22, identities=(str(fw),)) or "")


def test_a_file_that_is_not_firmware_is_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.fw"
    notes.write_text("hello\n")
    with pytest.raises(FleetError, match="not a usable .fw"):
        read_firmware_head(notes)


def test_installed_running_or_hot_swapped_in() -> None:
    assert installed(status(), "u1") == (True, False)
    assert installed(status(), "u2") == (False, False)
    assert installed(HOT_SWAPPED, "u2") == (True, True)
    # the boot env names the new slot but the app does not serve from it (a revert, say): not installed
    assert installed({**HOT_SWAPPED, "app": {"version": "1.0.0", "slot": "a"}}, "u2") == (False, False)


def test_refusals_the_device_would_answer(firmware: FirmwareFactory) -> None:
    """Busy states first, then the device's own rules (sshfwup.update.rules, as `firmware diff
    --running` applies them): its words, not a paraphrase."""
    fw = firmware("2.0.0")
    assert refusal(status(), "d", fw) is None
    assert refusal(status(), "d") is None  # no firmware: only whether it is busy
    assert "applying an update" in (refusal(status(update_in_progress=True), "d", fw) or "")
    assert "boot environment" in (refusal(status(boot_env_error="bad crc"), "d", fw) or "")
    assert "d would refuse it: a reboot is pending: slot b (2.0.0) is installed" in (refusal(HOT_SWAPPED, "d", fw) or "")
    assert "is not validated yet" in (refusal(status(validated=False), "d", fw) or "")
    older = refusal(status(), "d", firmware("0.9.0"))
    assert older and "0.9.0 is older than the running 1.0.0 (a downgrade)" in older
    allowed = status(update_rules={"allow_downgrade": True, "signed_only": False, "public_keys": []})
    assert refusal(allowed, "d", firmware("0.9.0")) is None
    signed_only = status(update_rules={"allow_downgrade": False, "signed_only": True, "public_keys": []})
    assert "signed" in (refusal(signed_only, "d", fw) or "")


def test_prediction_from_the_released_firmware(firmware: FirmwareFactory, tmp_path: Path) -> None:
    releases = tmp_path / "releases"
    releases.mkdir()
    v1, v2 = firmware("1.0.0"), firmware("2.0.0")
    sysfile = firmware("1.5.0", changes=("system-file",))
    for fw in (v1, sysfile):
        (releases / fw.name).write_bytes(fw.read_bytes())
    (releases / "junk.fw").write_text("not firmware")  # skipped, not fatal
    target = read_firmware_head(v2)
    u1, u15 = read_firmware_head(v1).uuid, read_firmware_head(sysfile).uuid

    hot = predict(status(running_uuid=u1, slots={"a": {"version": "1.0.0", "uuid": u1}}), target, releases, "d")
    assert (hot.verdict, hot.from_version, hot.to_version, hot.running_file) == ("hot", "1.0.0", "2.0.0", str(releases / v1.name))

    reboot = predict(status(running_uuid=u15, slots={"a": {"version": "1.5.0", "uuid": u15}}), target, releases, "d")
    assert reboot.verdict == "reboot" and any("/etc" in r for r in reboot.reasons), reboot

    unknown = predict(status(running_uuid="u-elsewhere", slots={"a": {"version": "0.9", "uuid": "u-elsewhere"}}),
                      target, releases, "d")  # fmt: skip
    assert unknown.verdict == "unknown" and "is not a .fw in" in unknown.reasons[0], unknown

    same = predict(status(running_uuid=target.uuid, slots={"a": {"version": "2.0.0", "uuid": target.uuid}}),
                   target, None, "d")  # fmt: skip
    assert same.verdict == "unchanged" and not same.reboot_pending

    refused = predict(HOT_SWAPPED, target, releases, "d")
    assert refused.refusal and "a reboot is pending" in refused.refusal


def test_the_devices_own_verdict_line_wins() -> None:
    assert verdict_from_lines(["fwup: Upgrading partition B", "sshfwup: hot reload: 1.0.0 → 2.0.0 in 2.5 s, 0 connections refused"]) == "hot"
    assert verdict_from_lines(["sshfwup: reboot required: /etc changed (/etc/x); rebooting into 3.0.0 (slot b)"]) == "reboot"
    assert verdict_from_lines(["sshfwup: already running 2.0.0 (uuid u2); nothing changed"]) == "unchanged"
    assert verdict_from_lines(["Success!"]) is None
