"""The upload bounds (sshfwup/update/intake.py) on their own: which bound ends an upload, with
which words, and that the update is aborted when it does. The same code runs under all five
transports (test_upload_matrix.py shows them end the same way)."""

from __future__ import annotations

import anyio
import pytest

from sshfwup.config import ServerConfig
from sshfwup.update.intake import Intake, UploadBounds, UploadStopped


class Aborted:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def abort(self, reason: str) -> None:
        self.reasons.append(reason)


async def test_data_passes_through() -> None:
    update = Aborted()
    intake = Intake(update, UploadBounds(idle=1, total=0, size=0))

    async def chunk() -> bytes:
        return b"abc"

    assert await intake.read(chunk) == b"abc"
    assert update.reasons == []


async def test_nothing_for_the_idle_bound_aborts_the_update_with_its_words() -> None:
    update = Aborted()
    bounds = UploadBounds(idle=0.2, total=0, size=0)
    with pytest.raises(UploadStopped) as e:
        await Intake(update, bounds).read(anyio.sleep_forever)  # type: ignore[arg-type]
    assert str(e.value) == "no data for 0 s ([server] idle_timeout); upload aborted" == bounds.idle_words()
    assert update.reasons == [str(e.value)]


async def test_a_trickle_inside_the_idle_bound_is_ended_by_the_total_bound() -> None:
    now = [0.0]
    update = Aborted()
    bounds = UploadBounds(idle=10, total=60, size=0)
    intake = Intake(update, bounds, clock=lambda: now[0])

    async def trickle() -> bytes:
        now[0] += 9  # a byte every 9 s: never idle for 10
        return b"x"

    with pytest.raises(UploadStopped) as e:
        for _ in range(100):
            await intake.read(trickle)
    assert now[0] == 63  # the first read at or past 60 s is refused, not waited for
    assert str(e.value) == "the upload took longer than 60 s ([server] upload_timeout); upload aborted"
    assert update.reasons == [str(e.value)]


async def test_the_wait_for_the_last_bytes_is_cut_at_the_total_bound() -> None:
    update = Aborted()
    bounds = UploadBounds(idle=30, total=0.3, size=0)
    with anyio.fail_after(5), pytest.raises(UploadStopped) as e:
        await Intake(update, bounds).read(anyio.sleep_forever)  # type: ignore[arg-type]
    assert "upload_timeout" in str(e.value)


def test_the_bounds_come_from_the_server_section() -> None:
    cfg = ServerConfig(idle_timeout=7, upload_timeout=90, max_upload_size=1024)
    assert UploadBounds.of(cfg) == UploadBounds(idle=7, total=90, size=1024)
    assert UploadBounds.of(ServerConfig()).total == 3600  # a default bound: a slow trickle cannot hold the lock forever
