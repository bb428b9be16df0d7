"""Run a Supervisor in a process of its own, for tests that kill the supervising process.

    python supervise.py MARKER ROOT

Starts the test app installed under ROOT/srv/app (see test_supervisor.install_app), prints the
app's pid on stdout once it is ready, then waits to be killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from sshfwup.config import AppConfig
from sshfwup.supervisor.supervisor import AppSource, Supervisor


async def main(marker: str, root: str) -> None:
    config = AppConfig(command=(sys.executable, "{app_dir}/server.py"), app_dir="/srv/app", ready_timeout=10, user="")
    async with Supervisor(config, marker=marker) as supervisor:
        instance = await supervisor.start(AppSource(Path(root), "a", "1.0.0"))
        print(instance.pid, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
