"""The simulated machine's state, ``D/machine.json``: written (atomically replaced) by the
machine at every change, read by ``SimMachine``, the CLI and humans."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sshfwup.system.fsutil import write_atomically

__all__ = ["STATE_FILE", "MachineError", "MachineState", "write_state"]

STATE_FILE = "machine.json"


class MachineError(Exception):
    """The simulated machine could not be started, reached, or did not reach a state in time."""


@dataclass(frozen=True)
class MachineState:
    """The contents of ``D/machine.json``."""

    pid: int
    state: str  # booting | up | rebooting | halted (nothing boots) | stopping | off
    boot_count: int = 0
    slot: str | None = None
    server_pid: int | None = None
    server_restarts: int = 0
    ready: bool = False
    status: str | None = None
    boot_reason: str = ""
    error: str | None = None

    @classmethod
    def read(cls, device_dir: Path) -> MachineState | None:
        """The last state written, or None when there is none (or it is unreadable)."""
        try:
            raw = json.loads((Path(device_dir) / STATE_FILE).read_text())
            known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
            return cls(**known)
        except (OSError, ValueError, TypeError):
            return None


def write_state(device_dir: Path, state: MachineState) -> None:
    # Not durable: the machine's state is rewritten often and means nothing after a host crash.
    write_atomically(device_dir / STATE_FILE, json.dumps(asdict(state), indent=2, sort_keys=True) + "\n", durable=False)

