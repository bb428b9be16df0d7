"""``sshfwup serve`` with a fault at one journal stage: the tests' seam for crashes and power cuts.

    python serve_with_fault.py STAGE kill|pause ONCE_FILE --config CONFIG

Runs the real daemon with a journal hook (``journal.StageHook``): right after STAGE is on disk
the server SIGKILLs itself (``kill``) or blocks its whole event loop as a hung kernel would
(``pause``, the test then cuts the power). ONCE_FILE is created when the fault fires and keeps
it from firing again after the service manager restarts the server. A simulated machine runs
it through ``SimDevice.set_server_command``; ``sshfwup serve`` itself has no such hook.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import anyio

from sshfwup.config import load_config
from sshfwup.daemon import run_daemon
from sshfwup.update.journal import Record
from sshfwup.ssh.logsafe import install

log = logging.getLogger("serve_with_fault")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("action", choices=("kill", "pause"))
    parser.add_argument("once", type=Path)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    install()

    def fault(record: Record) -> None:
        if record.stage != args.stage or args.once.exists():
            return
        args.once.touch()
        log.warning("fault: %s after stage %s", args.action, record.stage)
        if args.action == "pause":
            time.sleep(3600)
        os.kill(os.getpid(), signal.SIGKILL)

    anyio.run(partial(run_daemon, load_config(args.config), on_stage=fault))


if __name__ == "__main__":
    main()
