"""A test callback: every task result per host, and the recap stats, as JSON in $RECORD_RESULTS_FILE.

(ansible-core no longer ships a JSON stdout callback; the tests keep the default human output
and read this file.)
"""

from __future__ import annotations

import json
import os
from typing import Any

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record_results"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[dict[str, Any]] = []

    def _record(self, result: Any, outcome: str) -> None:
        entry = {"task": result._task.get_name(), "host": result._host.get_name(), "outcome": outcome}
        entry["result"] = json.loads(json.dumps(result._result, default=str))
        # ansible-core 2.19 keeps the outcome out of the result dict handed to callbacks
        entry["result"].update(failed=outcome == "failed", unreachable=outcome == "unreachable")
        self.tasks.append(entry)

    def v2_runner_on_ok(self, result: Any) -> None:
        self._record(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._record(result, "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._record(result, "unreachable")

    def v2_runner_on_skipped(self, result: Any) -> None:
        self._record(result, "skipped")

    def v2_playbook_on_stats(self, stats: Any) -> None:
        hosts = sorted(stats.processed.keys())
        summary = {h: stats.summarize(h) for h in hosts}
        with open(os.environ["RECORD_RESULTS_FILE"], "w", encoding="utf-8") as f:
            json.dump({"tasks": self.tasks, "stats": summary}, f)
