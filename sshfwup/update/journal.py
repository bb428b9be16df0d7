"""Where the last update stands, on disk: fsync'd and atomically replaced at every stage.

A crash or power loss can stop the server at any instant. On the next start :func:`plan_recovery`
reads the record, the boot environment and the mount table, and says how to get back to a state
that is consistent (the boot env names firmware that is either running or known good), leaks
nothing (no stale mount, no stray app process) and allows the next step (an update or a reboot).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sshfwup.system.fsutil import write_atomically

log = logging.getLogger(__name__)

__all__ = ["FAILED_STAGES", "Journal", "Recovery", "Record", "Stage", "StageHook", "plan_recovery"]

Stage = Literal[
    "receiving",  # fwup is writing the inactive slot
    "applied",  # fwup finished: the boot env names the new slot
    "mounted",  # the new slot is mounted read-only
    "inspected",  # verdict known
    "swapping",  # the new app version is starting / the old one draining
    "observing",  # the new version serves; watching it
    "hot",  # done: the app runs the new version from the new slot; reboot pending
    "reboot",  # done: a reboot into the new firmware was requested
    "installed",  # done: installed for the next boot by a callback that does not reboot
    "unchanged",  # done: the upload was the firmware already running; fwup never ran
    "booted",  # the device booted the new firmware
    "validated",  # the new firmware proved itself after boot
    "failed",  # fwup failed or refused: nothing changed
    "rolled-back",  # the new version failed; the old one serves; boot env reverted (if configured)
    "interrupted",  # a crash stopped an update midway; recovery restored the old firmware
    "reverted",  # an operator reverted to the previous firmware
    "fell-back",  # the bootloader went back to the old firmware: the new one never validated
]

ACTIVE_STAGES = ("receiving", "applied", "mounted", "inspected", "swapping", "observing")
#: stages after which the new firmware was to boot next (a trial until it validates)
TRIAL_STAGES = ("hot", "reboot", "installed", "booted")
#: stages that say the update did not take
FAILED_STAGES = ("failed", "rolled-back", "interrupted", "fell-back")


@dataclass(frozen=True)
class Record:
    id: str
    stage: Stage
    uploader: str = ""
    from_slot: str | None = None
    to_slot: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    app_slot: str | None = None  # the slot the app runs from once the update is done
    app_root: str | None = None  # that slot's tree (running root or a mount of the new slot)
    app_version: str | None = None
    verdict: str = ""
    reasons: tuple[str, ...] = ()
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    history: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["history"] = [list(h) for h in self.history]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Record":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["reasons"] = tuple(d.get("reasons", ()))
        d["history"] = tuple(tuple(h) for h in d.get("history", ()))
        return cls(**d)


#: Called with every record right after it is on disk. The seam for tests that put a crash or a
#: power cut at an exact stage (tests/apps/serve_with_fault.py installs one); nothing in
#: ``sshfwup serve`` does.
StageHook = Callable[[Record], None]


class Journal:
    def __init__(self, data_dir: Path, *, on_stage: StageHook | None = None) -> None:
        self.path = data_dir / "journal.json"
        self.error: str | None = None  # why the last write failed (status shows it)
        self._seen: tuple[int, int, int] | None = self._stamp()
        self._current: Record | None = self._load()
        self._on_stage = on_stage

    @property
    def current(self) -> Record | None:
        """The record as on disk: the other process of ``sshfwup serve`` (supervisor or SSH front)
        may have advanced it since (every write replaces the file: a new inode). While the disk
        refuses writes (``error``), the record in memory is the truth."""
        if self.error is None:
            stamp = self._stamp()
            if stamp != self._seen and stamp is not None:
                self._seen = stamp
                self._current = self._load()
        return self._current

    @current.setter
    def current(self, rec: Record | None) -> None:
        self._current = rec

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _load(self) -> Record | None:
        try:
            raw = json.loads(self.path.read_text())
            if not isinstance(raw, dict):
                raise ValueError(f"expected a JSON object, found {type(raw).__name__}")
            return Record.from_json(raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            # A torn write cannot happen (atomic replace), but a hand-edited file can: keep going.
            log.error("journal %s is unreadable (%s); starting without it", self.path, e)
            return None

    def begin(self, **fields: Any) -> Record:
        now = time.time()
        rec = Record(id=os.urandom(6).hex(), stage="receiving", started=now, updated=now, **fields)  # (not uuid: it imports platform)
        rec = replace(rec, history=(("receiving", now),))
        self._write(rec)
        return rec

    def advance(self, stage: Stage, **fields: Any) -> Record:
        assert self.current is not None, "advance() before begin()"
        now = time.time()
        rec = replace(self.current, stage=stage, updated=now, history=(*self.current.history, (stage, now)), **fields)
        self._write(rec)
        return rec

    def summary(self) -> dict[str, Any] | None:
        rec = self.current
        if rec is None:
            return None
        return {
            "id": rec.id,
            "stage": rec.stage,
            "from": rec.from_version,
            "to": rec.to_version,
            "to_slot": rec.to_slot,
            "verdict": rec.verdict,
            "uploader": rec.uploader,
            "updated": rec.updated,
        }

    def _write(self, rec: Record) -> None:
        data = json.dumps(rec.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, data, mode=0o644, durable=True)  # the rename must survive a power loss
            self.error = None
            self._seen = self._stamp()
        except OSError as e:
            # A full or read-only data partition must not stop a fix from being uploaded: the
            # record stays in memory, status says it is not on disk, and recovery after a crash
            # falls back on the boot env and the bootloader's own fallback.
            if self.error is None:
                log.error("cannot write the journal %s (%s): this update's stages are not on disk", self.path, e)
            self.error = f"{self.path}: {e.strerror or e}"
        self.current = rec
        log.debug("journal: %s %s", rec.id, rec.stage)
        if self._on_stage is not None:
            self._on_stage(rec)


@dataclass(frozen=True)
class Recovery:
    """What the server does at start, decided from the journal, the boot env and the mount table."""

    app_slot: str  # run the app from this slot
    mount_app_slot: bool  # that slot is not the running root: mount it read-only first
    revert_to: str | None = None  # write the boot env back to this slot first
    reboot: bool = False  # a requested reboot never happened: do it now
    give_up: str | None = None  # mark this slot rolled back: its firmware never validated
    stage: Stage | None = None  # new journal stage to record
    message: str = ""


def plan_recovery(rec: Record | None, *, running_root: str, active: str | None, written: str | None = None) -> Recovery:
    """Pure decision; see the module docstring. ``active`` is the boot env's slot; ``written``: what
    an interrupted fwup left in the other slot, when the boot env marks it incomplete (the words of
    ``after_fwup.what_changed``)."""
    R, A = running_root, active
    if rec is None:
        return Recovery(R, False, message="no update on record")
    if rec.stage in ACTIVE_STAGES:
        if rec.from_slot is not None and R != rec.from_slot:
            # Power was lost mid-update after fwup switched the boot env: the bootloader started
            # the new firmware, which validates itself only if its app proves healthy.
            return Recovery(
                R, False, stage="booted",
                message=f"update {rec.id} was interrupted at stage '{rec.stage}' by a reboot; booted the new firmware in slot {R}",
            )
        # The update never finished: the uploader saw a dropped connection and will retry.
        # Put the boot env back on the firmware that is running (and was validated before fwup).
        revert = R if A is not None and A != R else None
        what = f"reverted the boot env to slot {R}" if revert else "the boot env was not switched"
        if written and not revert:
            return Recovery(
                R, False, stage="interrupted",
                message=f"update {rec.id} was interrupted at stage '{rec.stage}'; the boot env was not switched; {written}",
            )
        return Recovery(
            R, False, revert_to=revert, stage="interrupted",
            message=f"update {rec.id} was interrupted at stage '{rec.stage}'; {what}; {rec.from_version or 'the old version'} keeps running",
        )
    if rec.stage in TRIAL_STAGES and rec.to_slot is not None and R != rec.to_slot and R == rec.from_slot and A == R:
        # The new firmware was to boot on trial, yet the old one runs and boots next: the
        # bootloader gave up on the new one after its trial boots (its kernel or init failed, or
        # it never validated), or a one-shot trial (tryboot) was lost to a power cut. Nothing of
        # sshfwup ran there to say so; say it here, and never offer that slot as a proven revert.
        return Recovery(
            R, False, stage="fell-back", give_up=rec.to_slot,
            message=(
                f"the bootloader fell back to slot {R} ({rec.from_version or 'the old firmware'}): "
                f"{rec.to_version or 'the new firmware'} in slot {rec.to_slot} never validated (its trial boots "
                f"failed, or a power cut lost a one-shot trial); slot {rec.to_slot} is marked rolled back"
            ),
        )
    if rec.stage == "hot":
        if A == rec.to_slot and R == rec.from_slot and rec.app_slot == rec.to_slot:
            return Recovery(
                rec.to_slot, True,
                message=f"resuming {rec.to_version} from slot {rec.to_slot} (hot-swapped; reboot pending)",
            )
        if R == rec.to_slot:
            return Recovery(R, False, stage="booted", message=f"booted {rec.to_version} from slot {R}")
        return Recovery(R, False, message=f"boot env no longer names slot {rec.to_slot}; running slot {R}")
    if rec.stage == "installed" and R == rec.to_slot:
        return Recovery(R, False, stage="booted", message=f"booted {rec.to_version} from slot {R}")
    if rec.stage == "reboot":
        if R == rec.to_slot:
            return Recovery(R, False, stage="booted", message=f"booted {rec.to_version} from slot {R}")
        if A == rec.to_slot:
            return Recovery(R, False, reboot=True, message=f"the reboot into {rec.to_version} did not happen; rebooting now")
        return Recovery(R, False, message=f"slot {rec.to_slot} is no longer active; running slot {R}")
    return Recovery(R, False, message=f"last update {rec.id}: {rec.stage}")
