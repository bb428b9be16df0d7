"""The SSH front's death costs the app nothing (issue 26), on the simulated device with its app
under load: SIGKILL of the front while idle, mid-upload, mid-inspection and mid-swap. Each time
the app answers every request, the supervisor (the service's main process) and the app keep their
pids, a new front answers SSH, the lock is free, and the cut update ends as a cut upload ends:
nothing switched before fwup's verdict, installed for the next boot after it, and a swap in
progress completes under the supervisor alone. bench/front_kill.py runs the same four points
longer (≥ 5,000 requests each) and times SSH's return."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import Sim, journal, output, upload, wait_unlocked, wait_until
from httpload import Load

from sshfwup.system import procs
from sshfwup.system.capabilities import held

FAST = {"app": {"ready_timeout": 3, "observe": 1.5, "drain_timeout": 3}}
SERVE_WITH_FAULT = Path(__file__).resolve().parents[1] / "apps" / "serve_with_fault.py"


@pytest.fixture
def sim_config() -> dict[str, Any]:
    return FAST


def front_pid(sim: Sim) -> int | None:
    """The SSH front: the server's child started with ``--front``."""
    state = sim.machine.state()
    return procs.ssh_front(state.server_pid) if state and state.server_pid else None


async def new_front(sim: Sim, old: int) -> int:
    await wait_until(lambda: front_pid(sim) not in (None, old), what="a new SSH front")
    pid = front_pid(sim)
    assert pid is not None
    return pid


async def kill_front_at(sim: Sim, stage: str) -> None:
    """Restart the server under the test entry point that SIGKILLs the front (only) right after
    the journal records ``stage`` — once."""
    once = sim.device.path / f"fault-{stage}-kill-front.fired"
    sim.device.set_server_command(
        [sys.executable, str(SERVE_WITH_FAULT), stage, "kill-front", str(once), "--config", "{config}"]
    )
    await sim.restart_server()


class Watch:
    """What must not change while the front dies: the supervisor, the app, their answers."""

    def __init__(self, sim: Sim) -> None:
        state = sim.machine.state()
        assert state is not None
        self.sim = sim
        self.server_pid = state.server_pid
        self.restarts = state.server_restarts
        self.app_pid = sim.app()["pid"]
        self.instance = sim.status()["server"]["instance"]
        self.front = front_pid(sim)
        assert self.front is not None, "no SSH front process"
        self.load = Load(sim.app_port)

    def supervisor_kept(self) -> None:
        state = self.sim.machine.state()
        assert state is not None and state.server_pid == self.server_pid, "the supervisor was restarted"
        assert state.server_restarts == self.restarts and state.boot_count == 1

    async def ssh_answers(self) -> None:
        front = await new_front(self.sim, self.front)
        status = await anyio.to_thread.run_sync(lambda: self.sim.ssh("status", "--json"))
        assert status.returncode == 0, output(status)
        server = json.loads(status.stdout)["server"]
        # the service is the supervisor's (its pid and instance: `upload --wait` sees no restart)
        assert server["pid"] == self.server_pid and server["front_pid"] == front == front_pid(self.sim)
        assert server["instance"] == self.instance


async def under_load(watch: Watch, work: Any) -> Any:
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch.load.run)
        await anyio.sleep(0.5)
        result = await work()
        await watch.ssh_answers()
        await anyio.sleep(0.5)
        watch.load.running = False
    assert watch.load.failures == [], watch.load.failures[:5]
    assert len(watch.load.answers) >= 200, len(watch.load.answers)
    return result


async def test_front_killed_while_idle(sim: Sim) -> None:
    watch = Watch(sim)

    async def work() -> None:
        assert watch.front is not None
        os.kill(watch.front, signal.SIGKILL)

    await under_load(watch, work)
    watch.supervisor_kept()
    assert sim.app()["pid"] == watch.app_pid
    logs = output(sim.ssh("logs", "-n", "200"))
    assert f"the SSH front (pid {watch.front}) was killed by SIGKILL" in logs, logs[-3000:]
    # the new front, too, runs without what only the supervisor needs (docs/security.md)
    front = front_pid(sim)
    assert front is not None
    supervisor = held("CapEff", watch.server_pid)
    for field in ("CapEff", "CapPrm", "CapBnd"):
        caps = held(field, front)
        assert "CAP_SYS_ADMIN" in caps and "CAP_DAC_OVERRIDE" in caps, (field, caps)
        gone = {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_PTRACE", "CAP_SETPCAP"}
        assert caps & gone == set(), (field, caps & gone)
    assert {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_KILL"} <= supervisor  # the supervisor keeps them


async def test_front_killed_mid_upload_switches_nothing(sim: Sim, firmware) -> None:
    await kill_front_at(sim, "receiving")
    watch = Watch(sim)
    result = await under_load(watch, lambda: upload(sim, firmware("2.0.0")))
    assert result.returncode != 0  # the front died under the uploader
    watch.supervisor_kept()
    await wait_until(lambda: journal(sim)["stage"] == "interrupted", what="the cut upload to be settled")
    wait_unlocked(sim)
    env = sim.env()
    assert env["nerves_fw_active"] == "a" and env["nerves_fw_validated"] == "1", env
    assert sim.app()["pid"] == watch.app_pid and sim.app()["version"] == "1.0.0"
    assert "the SSH front was killed by SIGKILL during the upload" in journal(sim)["verdict"]
    good = await upload(sim, firmware("2.0.0"))  # the next update goes through the new front
    assert good.returncode == 0, output(good)


async def test_front_killed_mid_inspection_completes_for_the_next_boot(sim: Sim, firmware) -> None:
    await kill_front_at(sim, "mounted")
    watch = Watch(sim)
    result = await under_load(watch, lambda: upload(sim, firmware("2.0.0")))
    assert result.returncode != 0
    watch.supervisor_kept()
    await wait_until(lambda: journal(sim)["stage"] == "installed", what="the cut update to be settled")
    wait_unlocked(sim)
    status = sim.status()
    # fwup had said OK: the update is complete, for the next boot; the app was not touched
    assert status["pending_reboot"] and status["active"] == "b" and not status["validated"], status
    assert status["app"]["version"] == "1.0.0" and status["app"]["pid"] == watch.app_pid
    assert "after fwup had applied 2.0.0" in status["last_update"]["verdict"], status["last_update"]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert str(sim.device.run_dir / "slots" / "b") not in mounts


async def test_front_killed_mid_swap_the_swap_completes(sim: Sim, firmware) -> None:
    watch = Watch(sim)

    async def work() -> Any:
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def go() -> None:
                results.append(await upload(sim, firmware("2.0.0")))

            tg.start_soon(go)
            await wait_until(lambda: journal(sim)["stage"] == "swapping", what="the swap to start")
            await anyio.sleep(0.3)  # the supervisor is starting 2.0.0 beside 1.0.0
            assert watch.front is not None
            killed_at = time.monotonic()
            os.kill(watch.front, signal.SIGKILL)
        assert killed_at
        return results[0]

    result = await under_load(watch, work)
    assert result.returncode != 0
    watch.supervisor_kept()
    await wait_until(lambda: journal(sim)["stage"] == "hot", what="the swap's ending to be recorded")
    wait_unlocked(sim)
    app = sim.app()
    assert app["version"] == "2.0.0" and app["slot"] == "b"
    status = sim.status()
    assert status["pending_reboot"] and status["app"]["version"] == "2.0.0"
    assert "the SSH front died during the swap" in status["last_update"]["verdict"], status["last_update"]


@pytest.mark.parametrize("sim_config", [{**FAST, "server": {"front_idle_exit": 2}}])
async def test_a_lazy_front_leaves_when_idle_and_the_next_connection_starts_it(sim: Sim) -> None:
    """[server] front_idle_exit: the front exits after 2 s without connections; the app and the
    supervisor stay; the next `ssh` waits in the backlog and is answered by a new front."""
    watch = Watch(sim)
    await wait_until(lambda: front_pid(sim) is None, timeout=15, what="the idle front to leave")
    watch.supervisor_kept()
    assert sim.app()["pid"] == watch.app_pid
    status = await anyio.to_thread.run_sync(lambda: sim.ssh("status", "--json"))
    assert status.returncode == 0, output(status)
    logs = output(sim.ssh("logs", "-n", "300"))
    assert "left after" in logs and "without connections; it starts again with the next one" in logs, logs[-2000:]
    # an open connection keeps it: `logs -f` for 4 s, twice front_idle_exit
    front = front_pid(sim)
    follower = subprocess.Popen(["ssh", *sim._opts(None, "-p"), f"{sim.user}@{sim.host}", "logs", "-f"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        await anyio.sleep(4)
        assert front is not None and front_pid(sim) == front, "the front left while a connection was open"
    finally:
        follower.kill()
        follower.wait()
    await wait_until(lambda: front_pid(sim) is None, timeout=15, what="the front to leave once the connection closed")
    watch.supervisor_kept()
