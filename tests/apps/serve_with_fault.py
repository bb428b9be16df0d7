"""``sshfwup serve`` with a fault at one journal stage: the tests' seam for crashes and power cuts.

    python serve_with_fault.py STAGE kill|kill-front|pause ONCE_FILE --config CONFIG

Runs the real daemon (both of its processes: the supervisor starts this script again as its SSH
front) with a journal hook (``journal.StageHook``) in each: right after STAGE is on disk, in
whichever process wrote it, ``kill`` SIGKILLs the whole server (the supervisor, and the front
with it: a crash of the service), ``kill-front`` SIGKILLs the SSH front only (the supervisor
restarts it and keeps the app), and ``pause`` blocks that process's event loop as a hung kernel
would (the test then cuts the power). ONCE_FILE is created when the fault fires and keeps it
from firing again after the service manager restarts the server. A simulated machine runs
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
from sshfwup.ssh.front import parse_fds, run_front
from sshfwup.update.journal import Record
from sshfwup.ssh.logsafe import install

log = logging.getLogger("serve_with_fault")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage")
    parser.add_argument("action", choices=("kill", "kill-front", "pause"))
    parser.add_argument("once", type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--front", help="set by the supervisor: run as its SSH front")
    args = parser.parse_args()
    front = args.front is not None
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s" if front else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    install()

    def fault(record: Record) -> None:
        if record.stage != args.stage or args.once.exists():
            return
        args.once.touch()
        log.warning("fault: %s after stage %s", args.action, record.stage)
        if args.action == "pause":
            time.sleep(3600)
        if args.action == "kill" and front:
            os.kill(os.getppid(), signal.SIGKILL)  # the supervisor: the whole service crashes
        os.kill(os.getpid(), signal.SIGKILL)

    config = load_config(args.config)
    if front:
        listen, control = parse_fds(args.front)
        sys.exit(anyio.run(partial(run_front, config, listen, control, on_stage=fault)))
    command = [sys.executable, __file__, args.stage, args.action, str(args.once), "--config", args.config]
    anyio.run(partial(run_daemon, config, on_stage=fault, front=command))


if __name__ == "__main__":
    main()
