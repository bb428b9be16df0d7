#!/usr/bin/env python3
"""Soak the update-safety model on simulated devices with the real fwup, for each boot contract:
first a planned walk that reaches every (abstract state, event) pair the model defines for that
contract (tests/model/: ``space(name).pairs``), then random uploads, faults and commands
(Hypothesis); every invariant is checked after every step, and what each event changed against
what it may change under the contract. Prints one (state, event) coverage table per contract,
the pairs that cannot happen with their reasons, and every failure as a row.

    sudo .venv/bin/python bench/soak.py [--contract all|NAME] [--steps 300] [--steps-per-run 12] [--seed N]
                                        [--pairs all|refusals|none]

``--steps`` is the total of random steps, shared evenly by the contracts walked. Exits 1 when an
invariant failed or a wanted pair was not reached (the row says which contract and pair).
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

Pair = tuple[str, str]


def soak_contract(name: str, args: argparse.Namespace, steps: int, seed: int) -> tuple[list[str], bool]:
    """The walk and the random steps under one contract: the lines to print, and whether it passed."""
    contract_space = model.space(name)
    wanted: tuple[Pair, ...] = {"all": contract_space.pairs, "refusals": contract_space.refusal_pairs,
                                "none": ()}[args.pairs]  # fmt: skip
    covered: Counter[Pair] = Counter()
    failures: list[tuple[str, str, str]] = []
    started = time.monotonic()
    walk_time, walk_events = 0.0, 0
    if wanted:
        print(f"soak {name}: planned walk over {len(wanted)} (state, event) pairs", flush=True)
        walker, _ = test_model.walk(wanted, name, log=None if args.quiet else (lambda line: print(line, flush=True)))
        covered.update(walker.covered)
        failures += walker.failures
        walk_time, walk_events = time.monotonic() - started, walker.events
        print(f"{name} walk: {walker.events} events on {walker.devices} devices in {walk_time:.0f} s", flush=True)
    random_steps = 0
    if steps > 0:
        runs = -(-steps // args.steps_per_run)
        print(f"soak {name}: {runs} random runs x {args.steps_per_run} steps, seed {seed}", flush=True)
        machine = test_model.machine_for(name)
        test_model.COVERED.clear()
        use_seed(seed)(machine)
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(max_examples=runs, stateful_step_count=args.steps_per_run, deadline=None,
                                  database=None, suppress_health_check=list(HealthCheck),
                                  phases=[Phase.generate] if args.no_shrink else list(Phase)),  # fmt: skip
                _min_steps=args.steps_per_run,
            )
        except Exception as e:  # the invariant's message says it all
            for err in getattr(e, "exceptions", [e]):
                failures.append(("(random walk)", f"seed {seed}", f"{type(err).__name__}: {err}"))
        random_steps = sum(test_model.COVERED.values())
        covered.update(test_model.COVERED)
    total = time.monotonic() - started
    lines = [f"\n{name}: {sum(covered.values())} events in {total:.0f} s (walk {walk_events} events in "
             f"{walk_time:.0f} s, {random_steps} random steps, seed {seed})"]  # fmt: skip
    lines += model.coverage_table(contract_space, covered, wanted)
    missed = [p for p in wanted if not covered.get(p)]
    surprises = [p for p in covered if contract_space.impossible(*p)]
    lines += [f"NOT REACHED ({name}): {s} x {e}" for s, e in missed]
    lines += [f"REACHED A PAIR THOUGHT IMPOSSIBLE ({name}): {s} x {e}: {contract_space.impossible(s, e)}"
              for s, e in surprises]  # fmt: skip
    lines += [f"\nFAILED ({name}): {s} x {e}: {m}" for s, e, m in failures]
    return lines, not (failures or missed or surprises)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contract", choices=("all", *model.CONTRACTS), default="all",
                        help="the boot contract(s) to soak (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=300,
                        help="random steps after the walks, in total over the contracts (default %(default)s; 0: none)")  # fmt: skip
    parser.add_argument("--steps-per-run", type=int, default=12, help="steps per simulated device (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed)")
    parser.add_argument("--pairs", choices=("all", "refusals", "none"), default="all",
                        help="the planned walks: every pair (default), the refusal pairs, or none")  # fmt: skip
    parser.add_argument("--no-shrink", action="store_true", help="report the first random failure as found (faster)")
    parser.add_argument("--quiet", action="store_true", help="do not print the walk's events")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    names = list(model.CONTRACTS) if args.contract == "all" else [args.contract]
    share = -(-args.steps // len(names)) if args.steps > 0 else 0
    started = time.monotonic()
    report: list[str] = []
    passed = True
    for name in names:
        lines, ok = soak_contract(name, args, share, seed)
        report += lines
        passed = passed and ok
    print("\n".join(report))
    print(f"\nsoak: {', '.join(names)} in {time.monotonic() - started:.0f} s, seed {seed}")
    if not passed:
        return 1
    print("every wanted pair of every contract reached; every invariant held after every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
