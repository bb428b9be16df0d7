"""When the app does not run, the device says why (issue 19, item 4): its public port answers
503 with the reason instead of hanging, and ``status`` shows the last exit and the app's last
lines of output; a good firmware then makes the port answer normally."""

from __future__ import annotations

import time
import urllib.error
from typing import Any

import anyio
import pytest
from conftest import Sim, output, upload

REASON = "cannot open /data/app.db: permission denied"


@pytest.fixture
def sim_firmware() -> dict[str, Any]:
    return {"app_behavior": {"fail_at_start": REASON}}  # the factory's 1.0.0 never starts


async def test_an_app_that_does_not_start_is_explained_and_its_port_answers_503(sim: Sim, firmware: Any) -> None:
    began = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as failure:
        await anyio.to_thread.run_sync(lambda: sim.app(timeout=10))
    assert time.monotonic() - began < 5  # answered, not left waiting in the queue
    assert failure.value.code == 503
    body = failure.value.read().decode()
    assert "the application is not running (1.0.0 exited with status 1 before it became ready" in body, body
    assert REASON not in body  # the app's output is for the operator (ssh), not the public port
    assert failure.value.headers["Retry-After"]

    status = sim.status()
    assert status["app"] is None
    assert status["app_down"]["reason"].startswith("1.0.0 exited with status 1 before it became ready")
    last = status["app_last_exit"]
    assert (last["version"], last["slot"], last["exit_code"], last["signal"]) == ("1.0.0", "a", 1, None)
    assert any(REASON in line for line in last["output"]), last["output"]
    text = output(sim.ssh("status"))
    assert "NOT RUNNING" in text and "last app exit:  1.0.0 exited with status 1" in text and REASON in text, text

    # a good firmware: nothing to swap from, so it boots, and the port answers normally
    result = await upload(sim, firmware("2.0.0"))
    assert result.returncode == 0, output(result)
    assert "the app is not running" in output(result)
    await sim.machine.wait_boot(2, timeout=60)
    assert sim.app()["version"] == "2.0.0"
    status = sim.status()
    assert status["app"]["state"] == "running" and status["app_down"] is None
