"""The device's rules before fwup (sshfwup/update/rules.py), one test per rule: the pure function
that the device's precheck and ``sshfwup firmware diff --running`` both apply (issue 25 item 4)."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from sshfwup.boot.bootenv import BootState, SlotInfo
from sshfwup.firmware.delta_source import DeltaSource
from sshfwup.update.fwhead import FirmwareHead
from sshfwup.update.rules import DeviceRules, judge, slots_from_status

V1 = "11111111-1111-5111-8111-111111111111"
V2 = "22222222-2222-5222-8222-222222222222"
V0 = "00000000-0000-5000-8000-000000000000"


def boot(active: str | None = "a", validated: bool = True, a: str | None = "1.0.0", b: str | None = None,
         b_state: str | None = None) -> BootState:  # fmt: skip
    slots = {"a": SlotInfo("a", a, V1 if a else None, "sim", "p"),
             "b": SlotInfo("b", b, V2 if b else None, "sim", "p", b_state)}  # fmt: skip
    return BootState(active, validated, slots, {})


def head(version: str = "2.0.0", uuid: str = V2, delta: DeltaSource | None = None) -> FirmwareHead:
    return FirmwareHead(uuid, version, "sim", "x86_64", "p", False, (), delta)


def test_a_good_upload_goes_to_fwup() -> None:
    j = judge(boot(), "a", head(), "unsigned", DeviceRules())
    assert j.refusal is None and j.kind is None and j.unchanged is None and not j.downgrade


def test_unknown_running_slot_is_refused() -> None:
    j = judge(boot(), None, head(), "unsigned", DeviceRules(), root_mount="/")
    assert j.kind == "state" and j.refusal is not None
    assert j.refusal.startswith("cannot tell which slot is running: nothing from [device] slots is mounted at /")


def test_pending_reboot_is_refused() -> None:
    j = judge(boot(active="b", b="2.0.0"), "a", head("3.0.0", V0), "unsigned", DeviceRules())
    assert j.kind == "state"
    assert j.refusal == (
        "a reboot is pending: slot b (2.0.0) is installed and boots next, but the device still runs slot a; "
        "another update now would overwrite the root filesystem in use. Reboot first (ssh <device> reboot), "
        "then upload again; the device was not changed"
    )


def test_unvalidated_running_firmware_is_refused() -> None:
    j = judge(boot(validated=False), "a", head(), "unsigned", DeviceRules())
    assert j.kind == "state" and j.refusal is not None
    assert j.refusal.startswith("the running firmware 1.0.0 (slot a) is not validated yet, and slot b is its fallback")


@pytest.mark.parametrize(("signature", "words"), [("unsigned", "Expecting signed firmware archive."),
                                                  ("other-key", "fails digital signature verification")])  # fmt: skip
def test_signature_the_device_does_not_trust_is_refused(signature: str, words: str) -> None:
    j = judge(boot(), "a", head(), signature, DeviceRules(signed_only=True))  # type: ignore[arg-type]
    assert j.kind == "signature" and j.refusal is not None and words in j.refusal
    assert j.refusal.endswith("the device was not changed")
    assert judge(boot(), "a", head(), "trusted", DeviceRules(signed_only=True)).refusal is None
    assert judge(boot(), "a", head(), signature, DeviceRules()).refusal is None  # type: ignore[arg-type]


def test_signature_comes_before_the_head() -> None:
    """An unsigned head is unreadable to a device that requires signatures: fwup refuses it, and no
    downgrade check runs."""
    j = judge(boot(), "a", head("0.9.0", V0), "unsigned", DeviceRules(signed_only=True))
    assert j.kind == "signature"


def test_downgrade_is_refused_unless_allowed() -> None:
    j = judge(boot(), "a", head("0.9.0", V0), "unsigned", DeviceRules())
    assert j.kind == "downgrade"
    assert j.refusal == ("update refused: 0.9.0 is older than the running 1.0.0 (a downgrade); set [update] "
                         "allow_downgrade = true on the device to allow it; the device was not changed")  # fmt: skip
    allowed = judge(boot(), "a", head("0.9.0", V0), "unsigned", DeviceRules(allow_downgrade=True))
    assert allowed.refusal is None and allowed.downgrade


def test_the_running_firmware_is_nothing_to_do() -> None:
    j = judge(boot(), "a", head("1.0.0", V1), "unsigned", DeviceRules())
    assert j.refusal is None and j.unchanged == f"already running 1.0.0 (uuid {V1}); nothing changed"


def test_delta_patch_for_another_firmware_is_refused() -> None:
    j = judge(boot(), "a", head(delta=DeltaSource(V0, "0.5.0")), "unsigned", DeviceRules())
    assert j.kind == "delta-source" and j.refusal is not None
    assert f"a delta patch to 2.0.0 for firmware 0.5.0 (uuid {V0}), but the device runs 1.0.0 (uuid {V1})" in j.refusal
    assert judge(boot(), "a", head(delta=DeltaSource(V1, "1.0.0")), "unsigned", DeviceRules()).refusal is None


def test_state_comes_first() -> None:
    j = judge(boot(validated=False), "a", head("0.9.0", V0), "other-key", DeviceRules(signed_only=True))
    assert j.kind == "state"


def test_slots_from_status_reads_what_status_reports() -> None:
    slots = slots_from_status({"a": {"version": "1.0.0", "uuid": V1, "state": None},
                               "b": {"version": "2.0.0", "uuid": V2, "state": "incomplete"}})  # fmt: skip
    assert slots["a"] == replace(boot().slots["a"], platform=None, product=None)
    assert slots["b"].state == "incomplete" and not slots["b"].usable
    assert slots_from_status({})["a"].version is None


def test_the_rules_are_pure() -> None:
    """No I/O: the module imports nothing that reaches the device, the disk or the network."""
    tree = ast.parse(Path(__file__).resolve().parents[2].joinpath("sshfwup/update/rules.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "collections.abc", "dataclasses", "typing", "sshfwup.boot.bootenv",
                        "fwhead", "outcome"}, imported  # fmt: skip
