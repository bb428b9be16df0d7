"""What every ``sshfwup firmware …`` / ``sshfwup keys …`` command shares: its exit statuses, the
error it raises for the operator, and the wording of sizes and hot/reboot claims.

Exit status: 0 done, 1 failed (message on stderr), 2 usage error, 3 ``diff --fail-on-reboot``
when the update would reboot, 4 ``diff --running`` when the device would refuse the upload.
"""

from __future__ import annotations

import sys

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REBOOT",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "CommandError",
    "claim_text",
    "human_size",
    "print_error",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REBOOT = 3
EXIT_REFUSED = 4  # diff --running: the device would refuse this upload before fwup


class CommandError(Exception):
    """A command failed for a reason the user can fix; the message says which."""


def print_error(text: str) -> None:
    """A line for the operator on stderr, ``sshfwup: `` first (a command's output is on stdout)."""
    print(f"sshfwup: {text}", file=sys.stderr)


def human_size(n: int | None) -> str:
    """A byte count for people: ``1.5 MiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def claim_text(hot: bool | None) -> str:
    """What a HOT_RELOAD marker value claims (None: no marker)."""
    if hot is None:
        return "reboot required (no HOT_RELOAD marker)"
    return "hot reload (app-only change)" if hot else "reboot required"
