"""The update-safety model (tests/model.py) on a simulated device with the real fwup, in two parts:

- a planned walk (``model.Walker``) that reaches (abstract state, event) pairs on purpose: in CI
  every refusal pair (``model.REFUSAL_PAIRS``: every event that is refused, from every state where
  it can be), in bench/soak.py every pair the model defines (``model.PAIRS``);
- a Hypothesis stateful test on top: random sequences of uploads (hot, reboot, bad, cut, slow,
  broken apps, the same firmware), power cuts at random moments, reboots, validate and revert.

After every event the invariants of a device at rest hold, and the event changed only what it
may change (``model.check_change``). CI runs a fixed, derandomized budget; bench/soak.py runs long.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from model import (
    CONFIG, REFUSAL_PAIRS, ModelDevice, Walker, coverage_table, fire, make_key, new_workdir, remove_workdir,
)  # fmt: skip

STEPS = int(os.environ.get("SSHFWUP_MODEL_STEPS", "10"))
EXAMPLES = int(os.environ.get("SSHFWUP_MODEL_EXAMPLES", "10"))
COVERED: Counter[tuple[str, str]] = Counter()  # (abstract state, event) pairs walked, over all runs

# The planned walk's device: the observation window is long enough for an event to start while a
# first boot is still unvalidated (settled/unvalidated), short enough not to slow hot swaps much.
WALK_CONFIG: dict[str, Any] = {**CONFIG, "app": {**CONFIG["app"], "observe": 1.5}}


def new_walk_device() -> ModelDevice:
    work = new_workdir()
    dev = ModelDevice(work, make_key(work), config=WALK_CONFIG)
    return dev


def close_walk_device(dev: ModelDevice) -> None:
    try:
        dev.close()
    finally:
        remove_workdir(dev.workdir)


def walk(pairs: tuple[tuple[str, str], ...], *, log: Any = None) -> tuple[Walker, list[tuple[str, str]]]:
    """Fire every pair in ``pairs`` on simulated devices; the walker and the pairs not reached."""
    walker = Walker(new_walk_device, close_walk_device, log=log)
    try:
        missed = walker.walk(pairs)
    finally:
        walker.close()
    return walker, missed


class UpdateSafety(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.work = new_workdir()
        self.dev = ModelDevice(self.work, make_key(self.work))

    def teardown(self) -> None:
        COVERED.update(self.dev.events)
        try:
            self.dev.close()
        finally:
            remove_workdir(self.work)

    @rule()
    def hot_upload(self) -> None:
        fire(self.dev, "hot-upload")

    @rule()
    def reboot_upload(self) -> None:
        fire(self.dev, "reboot-upload")

    @rule(kind=st.sampled_from(["garbage", "flipped", "wrong-platform"]))
    def bad_upload(self, kind: str) -> None:
        fire(self.dev, f"bad-upload:{kind}")

    @rule(fraction=st.floats(min_value=0.0, max_value=0.9999))
    def cut_upload(self, fraction: float) -> None:
        fire(self.dev, "cut-upload", fraction)

    @rule()
    def slow_tail_upload(self) -> None:
        fire(self.dev, "slow-tail-upload")

    @rule(kind=st.sampled_from(["never_ready", "crash_after"]))
    def broken_app_upload(self, kind: str) -> None:
        fire(self.dev, f"broken-app:{kind}")

    @rule(delay=st.floats(min_value=0.0, max_value=2.5))
    def power_cut_during_upload(self, delay: float) -> None:
        fire(self.dev, "power-cut", delay)

    @rule()
    def reboot(self) -> None:
        fire(self.dev, "reboot")

    @rule()
    def validate(self) -> None:
        fire(self.dev, "validate")

    @rule()
    def revert(self) -> None:
        fire(self.dev, "revert")

    @rule()
    def same_firmware_upload(self) -> None:
        fire(self.dev, "same-upload")

    @invariant()
    def invariants_hold(self) -> None:
        self.dev.check()


MODEL_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,  # a fixed sequence in CI; SSHFWUP_MODEL_EXAMPLES/STEPS or bench/soak.py for more
    database=None,
    suppress_health_check=list(HealthCheck),
    # no shrinking: a failure's message names the invariant, the device's state and the last
    # steps, and shrinking real devices would blow the suite's time budget
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


@pytest.mark.model
def test_every_refusal_pair_changes_nothing(fwup: str) -> None:
    """Every event that is refused, from every state where it can be (model.REFUSAL_PAIRS), is
    reached on purpose; each one changes nothing (no boot env key, no mark, no slot byte)."""
    started = time.monotonic()
    walker, missed = walk(REFUSAL_PAIRS, log=print)
    print(f"refusal pairs: {len(REFUSAL_PAIRS) - len(missed)} of {len(REFUSAL_PAIRS)} reached in "
          f"{walker.events} events on {walker.devices} devices, {time.monotonic() - started:.0f} s")  # fmt: skip
    print("\n".join(coverage_table(walker.covered, REFUSAL_PAIRS)))
    assert not missed, f"refusal pairs not reached: {missed}"


@pytest.mark.model
def test_update_safety_model(fwup: str) -> None:
    print(f"\nupdate-safety model: {EXAMPLES} runs x up to {STEPS} steps, derandomized")
    started = time.monotonic()
    COVERED.clear()
    run_state_machine_as_test(UpdateSafety, settings=MODEL_SETTINGS)
    steps = sum(COVERED.values())
    print(f"{steps} steps in {time.monotonic() - started:.0f} s; {len(COVERED)} (state, event) pairs covered:")
    for (state, event), n in sorted(COVERED.items()):
        print(f"  {state:<40} {event:<28} {n}")
    assert steps >= EXAMPLES  # the machine really ran
