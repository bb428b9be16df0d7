"""The device's rules before fwup, as pure functions: no I/O, no device, no clock.

The device applies them while an upload starts (:mod:`.precheck` with the boot state it reads,
:class:`~sshfwup.update.update.Update` with the upload's head); ``sshfwup firmware diff --running``
applies the same functions to what the device reports in ``status --json``, so that its
prediction is the device's answer (issue 25 item 4). Order, as on the device: the device's state
(which slot runs, a pending reboot, an unvalidated firmware), then the signature (fwup's, when the
device requires signed firmware: an unreadable head goes to fwup, which refuses it), then what the
head says (the same firmware: nothing to do; a downgrade; a delta patch for another firmware).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sshfwup.boot.bootenv import BootState, SlotInfo, other_slot

from .fwhead import FirmwareHead, version_key
from .outcome import UpdateError, UpdateRefused

__all__ = ["DeviceRules", "HeadJudgement", "Judgement", "Signature", "judge", "judge_head", "signature_refusal",
           "state_refusal"]  # fmt: skip

#: How an upload's signature stands against the device's trusted keys: signed by one of them,
#: not signed at all, or signed by another key.
Signature = Literal["trusted", "unsigned", "other-key"]


@dataclass(frozen=True)
class DeviceRules:
    """The device's settings the rules depend on (``[update] allow_downgrade``, ``[fwup]
    public_keys``)."""

    allow_downgrade: bool = False
    signed_only: bool = False  # public keys are configured: fwup refuses unsigned or foreign archives


def state_refusal(before: BootState, root: str | None, *, root_mount: str = "the root mount point") -> str | None:
    """Why the device refuses any upload in this state (None: it takes one): it cannot tell which
    slot runs, a reboot is pending, or the running firmware is not validated yet."""
    if root is None:
        return f"cannot tell which slot is running: nothing from [device] slots is mounted at {root_mount}"
    if before.active is not None and before.active != root:
        version = before.version(before.active) or "new firmware"
        return (
            f"a reboot is pending: slot {before.active} ({version}) is installed and boots next, but the device "
            f"still runs slot {root}; another update now would overwrite the root filesystem in use. "
            f"Reboot first (ssh <device> reboot), then upload again"
        )
    if before.active == root and not before.validated:
        # The other slot is this firmware's fallback until it validates: never write it now
        # (fwup's upgrade tasks refuse too, but only after the upload started).
        return (
            f"the running firmware {before.version(root) or '?'} (slot {root}) is not validated yet, and slot "
            f"{other_slot(root)} is its fallback; wait until it proves healthy (it validates itself) or run "
            f"`ssh <device> validate`, then upload again"
        )
    return None


def signature_refusal(signature: Signature, rules: DeviceRules) -> str | None:
    """fwup's refusal (``--public-key-file``) of an archive the device's keys do not sign."""
    if not rules.signed_only or signature == "trusted":
        return None
    if signature == "unsigned":
        return "Expecting signed firmware archive. (the device requires firmware signed by one of its keys)"
    return "Firmware archive's meta.conf fails digital signature verification. (signed by a key the device does not trust)"


@dataclass(frozen=True)
class HeadJudgement:
    """What the upload's head means for the running firmware."""

    downgrade: bool = False  # older than the running version, and allowed
    unchanged: str | None = None  # the verdict when it is the running firmware: nothing to do
    # Why it is refused: UpdateError for a downgrade the config does not allow, UpdateRefused
    # for a delta patch made for another firmware than the running one.
    refusal: UpdateError | None = None


def judge_head(head: FirmwareHead, running: SlotInfo, root: str, *, allow_downgrade: bool) -> HeadJudgement:
    """The same firmware as the one running needs no update at all; an older one is a downgrade,
    refused unless ``[update] allow_downgrade``; a delta patch made for another firmware than the
    running one is refused."""
    downgrade = False
    if (running.version and head.version and version_key(head.version) < version_key(running.version)
            and running.uuid != head.uuid):  # fmt: skip
        if not allow_downgrade:
            reason = (f"update refused: {head.version} is older than the running {running.version} (a downgrade); "
                      f"set [update] allow_downgrade = true on the device to allow it; the device was not changed")
            return HeadJudgement(refusal=UpdateError(reason))
        downgrade = True
    if running.uuid and running.uuid == head.uuid:
        return HeadJudgement(downgrade, unchanged=f"already running {head.version} (uuid {head.uuid}); nothing changed")
    source = head.delta_source
    if source is not None and source.uuid != running.uuid:
        # fwup would find out only at the end, after rewriting the whole slot from the wrong source
        runs = f"{running.version or 'a firmware'} (uuid {running.uuid})" if running.uuid else (
            f"{running.version or 'a firmware'} whose uuid is not recorded ({root}.nerves_fw_uuid unset)")
        reason = (
            f"this upload is a delta patch to {head.version} for firmware {source}, but the device runs "
            f"{runs} in slot {root}; send the full .fw, or a patch made from the firmware the device runs; "
            "the device was not changed"
        )
        return HeadJudgement(downgrade, refusal=UpdateRefused(reason))
    return HeadJudgement(downgrade)


RefusalKind = Literal["state", "signature", "downgrade", "delta-source"]


@dataclass(frozen=True)
class Judgement:
    """The device's answer to an upload before fwup writes: refused (``refusal``, the device's
    words, and ``kind``), nothing to do (``unchanged``), or it goes to fwup (a ``downgrade``
    when older and allowed)."""

    refusal: str | None = None
    kind: RefusalKind | None = None
    unchanged: str | None = None
    downgrade: bool = False

    def to_json(self) -> dict[str, object]:
        return {"refusal": self.refusal, "kind": self.kind, "unchanged": self.unchanged, "downgrade": self.downgrade}


def judge(before: BootState, root: str | None, head: FirmwareHead, signature: Signature, rules: DeviceRules,
          *, root_mount: str = "the root mount point") -> Judgement:  # fmt: skip
    """Every rule the device applies before fwup, in its order (see the module docstring)."""
    refused = state_refusal(before, root, root_mount=root_mount)
    if refused is not None:
        return Judgement(f"{refused}; the device was not changed", "state")
    assert root is not None
    refused = signature_refusal(signature, rules)
    if refused is not None:
        return Judgement(f"update failed: {refused}; the device was not changed", "signature")
    judged = judge_head(head, before.slots[root], root, allow_downgrade=rules.allow_downgrade)
    if judged.refusal is not None:
        kind: RefusalKind = "delta-source" if isinstance(judged.refusal, UpdateRefused) else "downgrade"
        return Judgement(str(judged.refusal), kind, downgrade=judged.downgrade)
    return Judgement(unchanged=judged.unchanged, downgrade=judged.downgrade)


def slots_from_status(slots: Mapping[str, Mapping[str, object]]) -> dict[str, SlotInfo]:
    """``status --json``'s ``slots`` as the boot state's slot records."""
    out = {}
    for s in ("a", "b"):
        info = slots.get(s) or {}
        version, uuid, state = info.get("version"), info.get("uuid"), info.get("state")
        out[s] = SlotInfo(s, version if isinstance(version, str) else None, uuid if isinstance(uuid, str) else None,
                          None, None, state if isinstance(state, str) else None)  # fmt: skip
    return out
