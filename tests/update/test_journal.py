"""The update journal: the test seam is installed by the caller, never read from the device."""

from __future__ import annotations

import json
from pathlib import Path

from sshfwup.update.journal import Journal, Record


def test_the_stage_hook_sees_each_record_once_it_is_on_disk(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    def hook(record: Record) -> None:
        on_disk = json.loads((tmp_path / "journal.json").read_text())
        seen.append((record.stage, on_disk["stage"]))

    journal = Journal(tmp_path, on_stage=hook)
    journal.begin(uploader="u")
    journal.advance("applied")
    journal.advance("mounted")
    assert seen == [("receiving", "receiving"), ("applied", "applied"), ("mounted", "mounted")]


def test_a_failpoint_file_on_the_device_does_nothing(tmp_path: Path) -> None:
    # The retired test hook: any process that could write the data dir could freeze or kill the
    # server with it. Now nothing reads it (a kill would end this test process).
    for stage in ("receiving", "applied"):
        (tmp_path / "failpoint").write_text(f"{stage} kill\n")
        journal = Journal(tmp_path)
        journal.begin() if stage == "receiving" else journal.advance(stage)
        assert (tmp_path / "failpoint").exists()
    assert Journal(tmp_path).current is not None


def test_no_production_module_reads_a_failpoint() -> None:
    package = Path(__file__).resolve().parents[2] / "sshfwup"
    offenders = [p for p in package.rglob("*.py") if "failpoint" in p.read_text()]
    assert offenders == []
