#!/usr/bin/env python3
"""Soak the update-safety model on a simulated device with the real fwup: first a planned walk
that reaches every (abstract state, event) pair the model defines (tests/model.py: PAIRS), then N
steps of random uploads, faults and commands (Hypothesis); every invariant is checked after every
step, and what each event changed against what it may change. Prints the (state, event) coverage
table, the pairs that cannot happen with their reasons, and every failure as a row.

    sudo .venv/bin/python bench/soak.py [--steps 300] [--steps-per-run 12] [--seed N] [--pairs all|refusals|none]

Exits 1 when an invariant failed or a wanted pair was not reached (the row says which).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sim"))

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import seed as use_seed  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

import model  # noqa: E402
import test_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="random steps after the walk, at least (default %(default)s; 0: none)")
    parser.add_argument("--steps-per-run", type=int, default=12, help="steps per simulated device (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    parser.add_argument("--pairs", choices=("all", "refusals", "none"), default="all",
                        help="the planned walk: every pair (default), the refusal pairs, or none")  # fmt: skip
    parser.add_argument("--no-shrink", action="store_true", help="report the first random failure as found (faster)")
    parser.add_argument("--quiet", action="store_true", help="do not print the walk's events")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    wanted = {"all": model.PAIRS, "refusals": model.REFUSAL_PAIRS, "none": ()}[args.pairs]
    covered: Counter[tuple[str, str]] = Counter()
    failures: list[tuple[str, str, str]] = []
    started = time.monotonic()

    walk_time = 0.0
    if wanted:
        print(f"soak: planned walk over {len(wanted)} (state, event) pairs", flush=True)
        walker, _ = test_model.walk(wanted, log=None if args.quiet else (lambda line: print(line, flush=True)))
        covered.update(walker.covered)
        failures += walker.failures
        walk_time = time.monotonic() - started
        print(f"walk: {walker.events} events on {walker.devices} devices in {walk_time:.0f} s", flush=True)

    steps = 0
    if args.steps > 0:
        runs = -(-args.steps // args.steps_per_run)
        print(f"soak: {runs} random runs x {args.steps_per_run} steps, seed {seed}", flush=True)
        test_model.COVERED.clear()
        use_seed(seed)(test_model.UpdateSafety)
        try:
            run_state_machine_as_test(
                test_model.UpdateSafety,
                settings=settings(max_examples=runs, stateful_step_count=args.steps_per_run, deadline=None,
                                  database=None, suppress_health_check=list(HealthCheck),
                                  phases=[Phase.generate] if args.no_shrink else list(Phase)),  # fmt: skip
                _min_steps=args.steps_per_run,
            )
        except Exception as e:  # the invariant's message says it all
            for err in getattr(e, "exceptions", [e]):
                failures.append(("(random walk)", f"seed {seed}", f"{type(err).__name__}: {err}"))
        steps = sum(test_model.COVERED.values())
        covered.update(test_model.COVERED)

    total = time.monotonic() - started
    print(f"\n{sum(covered.values())} events in {total:.0f} s (walk {walk_time:.0f} s, {steps} random steps, "
          f"seed {seed}):")  # fmt: skip
    for line in model.coverage_table(covered, wanted or model.PAIRS):
        print(line)
    missed = [p for p in wanted if not covered.get(p)]
    surprises = [p for p in covered if model.impossible(*p)]
    for state, event in missed:
        print(f"NOT REACHED: {state} x {event}")
    for state, event in surprises:
        print(f"REACHED A PAIR THOUGHT IMPOSSIBLE: {state} x {event}: {model.impossible(state, event)}")
    for state, event, message in failures:
        print(f"\nFAILED: {state} x {event}: {message}")
    if failures or missed or surprises:
        return 1
    print("\nevery wanted pair reached; every invariant held after every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
