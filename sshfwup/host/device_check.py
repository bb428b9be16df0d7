"""What a device would answer to an upload before fwup writes a byte, from its ``status --json``.

The device decides with :func:`sshfwup.update.rules.judge` (its state, the signature, what the
upload's head says); this applies the same function to what the device reports, so that a
prediction on the host — ``sshfwup firmware diff --running``, a fleet roll-out's plan — is the
device's own answer (issue 25 item 4).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sshfwup.boot.bootenv import BootState
from sshfwup.firmware.archive import read_head
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.zipstream import ZipStream
from sshfwup.update.fwhead import MAX_HEAD, read_head_bytes
from sshfwup.update.rules import DeviceRules, Judgement, Signature, judge, slots_from_status

__all__ = ["DeviceCheck", "UnreadableFirmware", "device_check"]


class UnreadableFirmware(Exception):
    """The firmware file cannot be read the way the device reads an upload's head."""


@dataclass(frozen=True)
class DeviceCheck:
    """The device's rules before fwup applied to what it reported (``--running``)."""

    judgement: Judgement
    rules: DeviceRules
    rules_source: str
    signature: Signature
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            **self.judgement.to_json(),
            "rules": {"allow_downgrade": self.rules.allow_downgrade, "signed_only": self.rules.signed_only},
            "rules_source": self.rules_source,
            "signature": self.signature,
        }


def device_check(status: dict[str, Any], host: str, new_fw: Path, config_allow_downgrade: bool | None) -> DeviceCheck:
    """What the device would answer to ``new_fw`` before fwup writes, from its ``status --json``:
    :func:`sshfwup.update.rules.judge`, the function the device itself applies."""
    import base64
    import binascii

    from sshfwup.firmware.keys import as_public_key, signature_matches

    notes: list[str] = []
    reported = status.get("update_rules")
    keys: list[bytes] = []
    if isinstance(reported, dict):
        rules = DeviceRules(bool(reported.get("allow_downgrade")), bool(reported.get("signed_only")))
        for text in reported.get("public_keys") or ():
            if not isinstance(text, str):
                continue  # configured but unreadable on the device: fwup cannot use it either
            try:
                keys.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                continue
        source = f"as {host} reports them (status --json: update_rules)"
    else:
        allow = bool(config_allow_downgrade)
        rules = DeviceRules(allow_downgrade=allow)
        where = "from --config" if config_allow_downgrade is not None else "the default"
        source = f"assumed: [update] allow_downgrade = {str(allow).lower()} ({where}), no signature required"
        notes.append(
            f"{host} does not report its update rules (its sshfwup predates update_rules in status --json): "
            f"this assumes [update] allow_downgrade = {str(allow).lower()} ({where}) and no required signature; "
            f"check the device's [update] and [fwup] public_keys, or pass its configuration with --config"
        )
    try:
        with new_fw.open("rb") as f:
            data = f.read(MAX_HEAD)
            info = read_head(ZipStream(io.BytesIO(data).read), source=str(new_fw))
    except (OSError, FirmwareError) as e:
        raise UnreadableFirmware(f"{new_fw}: {e}") from None
    head = read_head_bytes(data, final=True)
    if head is None:
        raise UnreadableFirmware(f"{new_fw}: its meta.conf cannot be read the way the device reads it")
    if info.signature is None:
        signature: Signature = "unsigned"
    else:
        trusted = False
        for key in keys:
            try:
                trusted = trusted or signature_matches(as_public_key(key), info.signature, info.meta_conf)
            except FirmwareError:
                continue
        signature = "trusted" if trusted else "other-key"
    slots = status.get("slots") if isinstance(status.get("slots"), dict) else {}
    active = status.get("active")
    before = BootState(active if active in ("a", "b") else None, bool(status.get("validated")),
                       slots_from_status(slots), {})  # fmt: skip
    root = status.get("running_root")
    judgement = judge(before, root if root in ("a", "b") else None, head, signature, rules,
                      root_mount="its root mount point")  # fmt: skip
    return DeviceCheck(judgement, rules, source, signature, tuple(notes))
