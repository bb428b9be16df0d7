"""What the device keeps of each installed firmware's meta.conf: its resources, per slot.

A ``.fw`` may install more than the root filesystem — a kernel, device trees, boot files, each
its own resource — and a change to any of them needs a reboot. The running firmware's meta.conf
is not on the device, so sshfwup records its resources (name, size, blake2b-256) when fwup
installs it, in ``<data_dir>/firmware/<slot>.json``, and compares the next upload against that
record. A record whose uuid is not the slot's (``<slot>.nerves_fw_uuid``) is stale and ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from sshfwup.system.fsutil import write_atomically

log = logging.getLogger(__name__)

__all__ = ["forget", "recorded_resources", "record"]

Resources = dict[str, tuple[int, str]]


def _path(data_dir: Path, slot: str) -> Path:
    return Path(data_dir) / "firmware" / f"{slot}.json"


def record(data_dir: Path, slot: str, uuid: str, version: str, resources: Iterable[tuple[str, int, str]]) -> None:
    """Remember what was installed in ``slot`` (best effort: a full data partition is logged)."""
    doc = {"uuid": uuid, "version": version, "resources": [[n, s, h] for n, s, h in resources]}
    path = _path(data_dir, slot)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", durable=True)
    except OSError as e:
        log.error("cannot record the resources of %s in slot %s (%s); the next update's non-rootfs "
                  "resources will count as changed", version, slot, e)  # fmt: skip


def forget(data_dir: Path, slot: str) -> None:
    try:
        _path(data_dir, slot).unlink(missing_ok=True)
    except OSError as e:
        log.error("cannot remove the record of slot %s: %s", slot, e)


def recorded_resources(data_dir: Path, slot: str, uuid: str | None) -> Resources | None:
    """The resources of the firmware in ``slot`` if on record for this very firmware (``uuid``)."""
    try:
        doc = json.loads(_path(data_dir, slot).read_text())
        if not uuid or doc.get("uuid") != uuid:
            return None
        return {str(n): (int(s), str(h)) for n, s, h in doc["resources"]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("the record of slot %s is unreadable (%s); treating it as unknown", slot, e)
        return None
