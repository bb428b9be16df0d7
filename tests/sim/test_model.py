"""The update-safety model (tests/model/) on a simulated device with the real fwup, in two parts:

- a planned walk (``model.Walker``) that reaches (abstract state, event) pairs on purpose: in CI
  every refusal pair of the default boot contract (every event that is refused, from every state
  where it can be), and for each other contract (uboot-nerves; fwup-ops on the tryboot-like
  layout) its own pairs (``ContractSpec.specific``) plus a sample of the rest chosen by a printed
  seed (``SSHFWUP_MODEL_SEED`` replays it; by default the day's number, so the sample rotates);
  bench/soak.py walks every pair of every contract;
- a Hypothesis stateful test on top, on the default contract: random sequences of uploads (hot,
  reboot, bad, cut, slow, broken apps, the same firmware), power cuts at random moments, reboots,
  validate and revert.

After every event the invariants of a device at rest hold, and the event changed only what it
may change under its contract (``model.check_change``). CI runs a fixed budget; bench/soak.py
runs long.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from model import (
    CONFIG, CONTRACTS, DEFAULT_CONTRACT, ModelDevice, StateSpace, Walker, draw_pairs, fire, make_key, new_workdir,
    remove_workdir, sample_seed, space, walk_report,
)  # fmt: skip

from safety_model.contracts import AUTOBOOT_ALL, AUTOBOOT_TRYBOOT, REBOOT_PARAM, RUNNING

from sshfwup.sim.bootloader import choose_for
from sshfwup.sim.tryboot import choose_tryboot

# The budget: the file stays within 4 minutes on a loaded 2-core machine with three contracts'
# walks (fwup-ops' own pairs cost one Hypothesis run and two sampled pairs per contract).
STEPS = int(os.environ.get("SSHFWUP_MODEL_STEPS", "8"))
EXAMPLES = int(os.environ.get("SSHFWUP_MODEL_EXAMPLES", "3"))
# How many pairs of each other contract CI walks beside its own (specific) pairs.
SAMPLE = int(os.environ.get("SSHFWUP_MODEL_SAMPLE", "3"))
COVERED: Counter[tuple[str, str]] = Counter()  # (abstract state, event) pairs walked, over all runs

# The planned walk's device: the observation window is long enough for an event to start while a
# first boot is still unvalidated (settled/unvalidated), short enough not to slow the walk much.
WALK_CONFIG: dict[str, Any] = {**CONFIG, "app": {**CONFIG["app"], "observe": 1.5}}


def sample_pairs(contract_space: StateSpace, seed: int, n: int = SAMPLE) -> tuple[tuple[str, str], ...]:
    """The contract's own pairs, then ``n`` more of its pairs drawn with ``seed``."""
    own = contract_space.specific_pairs
    rest = [p for p in contract_space.pairs if p not in own]
    return (*own, *draw_pairs(rest, n, f"{contract_space.name}:{seed}"))


def walk(pairs: tuple[tuple[str, str], ...], contract_name: str = DEFAULT_CONTRACT, *, log: Any = None
         ) -> tuple[Walker, list[tuple[str, str]]]:  # fmt: skip
    """Fire every pair in ``pairs`` on simulated devices under ``contract_name``; the walker and the
    pairs not reached."""

    def new_device() -> ModelDevice:
        work = new_workdir()
        return ModelDevice(work, make_key(work), config=WALK_CONFIG, contract_name=contract_name)

    def close_device(dev: ModelDevice) -> None:
        try:
            dev.close()
        finally:
            remove_workdir(dev.workdir)

    walker = Walker(space(contract_name), new_device, close_device, log=log)
    try:
        missed = walker.walk(pairs)
    finally:
        walker.close()
    return walker, missed


class UpdateSafety(RuleBasedStateMachine):
    contract_name = DEFAULT_CONTRACT  # bench/soak.py runs a subclass per contract

    def __init__(self) -> None:
        super().__init__()
        self.work = new_workdir()
        self.dev = ModelDevice(self.work, make_key(self.work), contract_name=self.contract_name)

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

    @rule(delay=st.floats(min_value=0.0, max_value=2.5))
    def front_killed(self, delay: float) -> None:
        fire(self.dev, "front-killed", delay)

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


def machine_for(contract_name: str) -> type[UpdateSafety]:
    """The Hypothesis state machine on devices under ``contract_name``."""
    if contract_name == DEFAULT_CONTRACT:
        return UpdateSafety
    name = "UpdateSafety_" + contract_name.replace("-", "_")
    return type(name, (UpdateSafety,), {"contract_name": contract_name})


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


def _report(walker: Walker, what: str, wanted: tuple[tuple[str, str], ...], missed: list[Any], started: float) -> None:
    print("\n".join(walk_report(walker, what, wanted, missed, time.monotonic() - started)))


def _envs() -> list[dict[str, str]]:
    """Boot environments over every value the two U-Boot contracts read (absent: not set)."""
    values = {
        "nerves_fw_active": ("a", "b"), "nerves_fw_validated": ("0", "1"), "nerves_fw_booted": ("0", "1", None),
        "nerves_fw_autovalidate": ("0", "1", None), "upgrade_available": ("0", "1", None),
        "bootcount": ("0", "2", "3", None),
    }  # fmt: skip
    out = []
    for combo in itertools.product(*values.values()):
        env = {k: v for k, v in zip(values, combo, strict=True) if v is not None}
        env.update({f"{s}.nerves_fw_version": "1.0.0" for s in ("a", "b")})
        out.append(env)
    return out


@pytest.mark.parametrize("contract_name", [name for name, spec in CONTRACTS.items() if spec.layout is None])
def test_contract_forecast_is_what_the_simulated_bootloader_does(contract_name: str) -> None:
    """The model's reading of a contract (tests/safety_model/contracts.py) and the simulator's
    bootloader agree: booting again and again with nothing validating runs exactly the slots of the
    model's forecast, the last one for good. (A wrong expectation on either side fails here in
    milliseconds, before any device walk.)"""
    view, choose = CONTRACTS[contract_name].view, choose_for(contract_name)
    wrong = []
    for env in _envs():
        forecast = view(env).forecast
        booted, now = [], dict(env)
        for _ in range(len(forecast) + 2):
            choice = choose(now)
            booted.append(choice.slot)
            now.update(choice.updates)
        wanted = [*forecast, forecast[-1], forecast[-1]]
        if booted != wanted:
            wrong.append(f"{env}: the bootloader boots {booted}, the model forecasts {wanted}")
    assert not wrong, f"{len(wrong)} environments disagree, e.g.\n" + "\n".join(wrong[:5])


def _autoboot(default: str, tryboot: str | None) -> str:
    """autoboot.txt as the tryboot layout's files write it (p2: slot a, p3: slot b)."""
    part = {"a": 2, "b": 3}
    text = f"[all]\ntryboot_a_b={'1' if tryboot else '0'}\nboot_partition={part[default]}\n"
    return text + (f"[tryboot]\nboot_partition={part[tryboot]}\n" if tryboot else "")


def test_fwup_ops_forecast_is_what_the_simulated_pi_firmware_does() -> None:
    """The model's reading of fwup-ops (autoboot.txt, the one-shot reboot parameter, the mounted
    root, nerves_fw_validated) and the simulator's Pi-like firmware (sshfwup/sim/tryboot.py) agree:
    restarting again and again with nothing validating runs the forecast's slots, the last for good
    (the parameter is used up by the first restart)."""
    view = CONTRACTS["fwup-ops"].view
    wrong = []
    for default, tryboot, param, running, validated in itertools.product(
        ("a", "b"), ("a", "b", None), ("", "0", "0 tryboot"), ("a", "b"), ("0", "1")
    ):
        record = {AUTOBOOT_ALL: default, RUNNING: running, "nerves_fw_validated": validated}
        record.update({AUTOBOOT_TRYBOOT: tryboot} if tryboot else {})
        record.update({REBOOT_PARAM: param} if param else {})
        forecast = view(record).forecast
        booted, now = [], param
        for _ in range(len(forecast) + 2):
            booted.append(choose_tryboot(_autoboot(default, tryboot), now, {2: "a", 3: "b"}).slot)
            now = ""
        wanted = [*forecast, forecast[-1], forecast[-1]]
        if booted != wanted:
            wrong.append(f"{record}: the firmware boots {booted}, the model forecasts {wanted}")
    assert not wrong, f"{len(wrong)} records disagree, e.g.\n" + "\n".join(wrong[:5])


@pytest.mark.model
def test_every_refusal_pair_changes_nothing(fwup: str) -> None:
    """Every event that is refused, from every state where it can be (the default contract's
    refusal pairs), is reached on purpose; each one changes nothing (no boot env key, no mark, no
    slot byte)."""
    started = time.monotonic()
    wanted = space(DEFAULT_CONTRACT).refusal_pairs
    walker, missed = walk(wanted, DEFAULT_CONTRACT, log=print)
    _report(walker, f"{DEFAULT_CONTRACT} refusal pairs", wanted, missed, started)
    assert not walker.failures, [f"{s} x {e}: {m.splitlines()[0]}" for s, e, m in walker.failures]
    assert not missed, f"refusal pairs not reached: {missed}"


@pytest.mark.model
@pytest.mark.parametrize("contract_name", [c for c in CONTRACTS if c != DEFAULT_CONTRACT])
def test_other_contract_sample(fwup: str, contract_name: str) -> None:
    """Another boot contract: its own pairs (where it behaves unlike the default: trial boots, the
    fallback, an unproven revert) and a seeded sample of the rest, with the contract's checks."""
    seed = sample_seed()
    wanted = sample_pairs(space(contract_name), seed)
    print(f"\n{contract_name}: {len(space(contract_name).specific_pairs)} own pairs + {len(wanted) - len(space(contract_name).specific_pairs)} "
          f"sampled with seed {seed} (replay: SSHFWUP_MODEL_SEED={seed})")  # fmt: skip
    started = time.monotonic()
    walker, missed = walk(wanted, contract_name, log=print)
    _report(walker, f"{contract_name} sample (seed {seed})", wanted, missed, started)
    assert not walker.failures, [f"{s} x {e}: {m.splitlines()[0]}" for s, e, m in walker.failures]
    assert not missed, f"pairs not reached: {missed}"


@pytest.mark.model
def test_update_safety_model(fwup: str) -> None:
    print(f"\nupdate-safety model ({DEFAULT_CONTRACT}): {EXAMPLES} runs x up to {STEPS} steps, derandomized")
    started = time.monotonic()
    COVERED.clear()
    run_state_machine_as_test(UpdateSafety, settings=MODEL_SETTINGS)
    steps = sum(COVERED.values())
    print(f"{steps} steps in {time.monotonic() - started:.0f} s; {len(COVERED)} (state, event) pairs covered:")
    for (state, event), n in sorted(COVERED.items()):
        print(f"  {state:<40} {event:<28} {n}")
    assert steps >= EXAMPLES  # the machine really ran
