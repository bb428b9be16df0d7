"""The update-safety model (tests/model.py) on the QEMU device (full tier, ``--run-vm``, marker
``vm``): the planned walk (``model.Walker``) fires a sample of (abstract state, event) pairs of
uboot-bootcount — the QEMU device's contract — on real boots, with the same checks as on the
simulated device (the invariants at rest, ``check_change``) through
``safety_model.vm_device.VmModelDevice``.

The sample: ``SSHFWUP_VM_MODEL_PAIRS`` pairs (default 2) drawn with a printed seed
(``SSHFWUP_MODEL_SEED`` replays a draw and its power-cut moments; by default the day's number),
then always a hot upload on a factory-fresh device and a power cut during an upload with a whole
firmware beside the validated one (settled/validated/other-whole). At most
``SSHFWUP_VM_MODEL_EVENTS`` events (default 12) bound the time: 325 s measured for the default
sample with the firmware pool built (``SSHFWUP_VM_DIR``); a first run also builds the pool on a
worker thread, ~3 min a firmware under load, and waits for the ones it needs.

Drawn from the states the walk reaches on purpose on this device without booting another, with the
events its firmware pool drives (``safety_model.vm_device``: ``VM_STATES``, ``VM_EVENTS``, and why).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal
from model import SEED_ENV, Walker, sample_seed, space, walk_report
from vmkit import Device  # type: ignore[import-not-found]

from safety_model.vm_device import ALWAYS, FirmwarePool, VmModelDevice, power_on, vm_sample
from sshfwup.vm.contracts import DEFAULT_CONTRACT as CONTRACT
from sshfwup.vm.image import VmDir

pytestmark = pytest.mark.vm

PAIRS = int(os.environ.get("SSHFWUP_VM_MODEL_PAIRS", "2"))
MAX_EVENTS = int(os.environ.get("SSHFWUP_VM_MODEL_EVENTS", "12"))


@pytest.fixture(scope="module")
def pool(vm_dir: Path) -> Iterator[FirmwarePool]:
    """The session's firmware, built on a worker thread while the first device boots."""
    firmware_pool = FirmwarePool(VmDir(vm_dir))
    try:
        yield firmware_pool
    finally:
        firmware_pool.close()


def test_model_sample_on_the_qemu_device(vm_dir: Path, portal: BlockingPortal, pool: FirmwarePool) -> None:
    seed = sample_seed()
    contract_space = space(CONTRACT)
    wanted = vm_sample(contract_space, seed, PAIRS)
    print(f"\nvm model ({CONTRACT}): {len(wanted)} pairs ({len(wanted) - len(ALWAYS)} drawn with seed {seed}; "
          f"replay: {SEED_ENV}={seed}; {len(ALWAYS)} always), at most {MAX_EVENTS} events: {list(wanted)}")  # fmt: skip
    cut_delays = random.Random(f"vm-cuts:{seed}")
    vm = VmDir(vm_dir)

    def new_device() -> VmModelDevice:
        return power_on(vm, portal, lambda running: Device(portal, running), pool, cut_delays)

    started = time.monotonic()

    def say(line: str) -> None:  # each step with the seconds since the start: what an event costs under TCG
        print(f"{time.monotonic() - started:5.0f} s {line}", flush=True)

    walker = Walker(contract_space, new_device, lambda dev: dev.close(), max_events=MAX_EVENTS, log=say)
    try:
        missed = walker.walk(wanted)
        last_steps = walker.dev.log[-12:] if walker.dev is not None else []
    finally:
        walker.close()
    print("\n".join(walk_report(walker, f"vm model sample (seed {seed})", wanted, missed, time.monotonic() - started)))
    print(f"last steps: {last_steps}")
    assert not walker.failures, [f"{s} x {e}: {m.splitlines()[0]}" for s, e, m in walker.failures]
    assert not missed, f"pairs not reached within {MAX_EVENTS} events: {missed}"
