#!/usr/bin/env python3
"""Soak the update-safety model: N steps of random uploads, faults and commands on a simulated
device with the real fwup, checking every invariant after every step (tests/model.py), then print
which (state, event) pairs were covered.

    sudo .venv/bin/python bench/soak.py [--steps 300] [--steps-per-run 12] [--seed N]

A failure prints the invariant, the device's env/status and the last steps, and exits 1.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import seed as use_seed  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

import test_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="total steps, at least (default %(default)s)")
    parser.add_argument("--steps-per-run", type=int, default=12, help="steps per simulated device (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    parser.add_argument("--no-shrink", action="store_true", help="report the first failure as found (faster)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    runs = -(-args.steps // args.steps_per_run)
    print(f"soak: {runs} runs x {args.steps_per_run} steps, seed {seed}", flush=True)
    test_model.COVERED.clear()
    use_seed(seed)(test_model.UpdateSafety)
    started = time.monotonic()
    try:
        run_state_machine_as_test(
            test_model.UpdateSafety,
            settings=settings(max_examples=runs, stateful_step_count=args.steps_per_run, deadline=None,
                              database=None, suppress_health_check=list(HealthCheck),
                              phases=[Phase.generate] if args.no_shrink else list(Phase)),  # fmt: skip
            _min_steps=args.steps_per_run,
        )
        failed = None
    except Exception as e:  # the invariant's message says it all
        failed = e
    steps = sum(test_model.COVERED.values())
    events = sorted({e for _, e in test_model.COVERED})
    states = sorted({s for s, _ in test_model.COVERED})
    print(f"\n{steps} steps in {time.monotonic() - started:.0f} s (seed {seed}); "
          f"{len(test_model.COVERED)} (state, event) pairs of {len(states)} states x {len(events)} events:")  # fmt: skip
    width = max(len(s) for s in states) if states else 10
    print(f"{'state':<{width}}  " + "  ".join(f"{e[:14]:>14}" for e in events))
    for s in states:
        print(f"{s:<{width}}  " + "  ".join(f"{test_model.COVERED.get((s, e), 0) or '.':>14}" for e in events))
    if failed is not None:
        for e in getattr(failed, "exceptions", [failed]):
            print(f"\nFAILED: {type(e).__name__}: {e}")
        return 1
    print("\nevery invariant held after every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
