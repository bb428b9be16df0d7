"""A planned walk through one contract's state space: a shortest path to each wanted state, then
the wanted event; and the coverage table it prints."""

from __future__ import annotations

import datetime
import os
import random
from collections import Counter
from typing import Any

from .device import ModelledDevice, ModelViolation
from .events import EVENTS, fire
from .space import FRESH, STATES, StateSpace

SEED_ENV = "SSHFWUP_MODEL_SEED"


def sample_seed() -> int:
    """The seed of a sampled walk: SSHFWUP_MODEL_SEED, else today's number (the sample rotates daily)."""
    return int(os.environ.get(SEED_ENV) or datetime.date.today().toordinal())


def draw_pairs(pairs: list[tuple[str, str]], n: int, salt: str) -> tuple[tuple[str, str], ...]:
    """``n`` of ``pairs`` (sorted first: the draw depends on the seed only), drawn with ``salt``."""
    ordered = sorted(pairs)
    return tuple(random.Random(salt).sample(ordered, min(n, len(ordered))))


class Walker:
    """Reaches each wanted (state, event) pair of ``space`` (one boot contract's): plans a shortest
    path to the state, fires the event; starts a fresh device when no path leads there (or the
    device wandered off). ``new_device`` makes a device under that contract; ``close_device``
    disposes of one."""

    def __init__(self, space: StateSpace, new_device: Any, close_device: Any, *, max_events: int = 2000,
                 log: Any = None) -> None:  # fmt: skip
        self.space = space
        self.new_device, self.close_device = new_device, close_device
        self.dev: ModelledDevice | None = None
        self.covered: Counter[tuple[str, str]] = Counter()
        self.max_events = max_events
        self.events = 0
        self.devices = 0
        self.failures: list[tuple[str, str, str]] = []  # (state, event, the violation's message)
        self.say = log or (lambda line: None)

    def _fire(self, event: str) -> str:
        """Fire ``event``; a violation is recorded (the pair counts as reached: it was) and the
        device is replaced by a fresh one, so one failure does not hide the pairs after it."""
        assert self.dev is not None
        self.events += 1
        state = self.dev.abstract_state()
        try:
            state = fire(self.dev, event)  # the state it was fired in (read again: it may have moved on)
            self.dev.check()
        except ModelViolation as e:
            self.failures.append((state, event, str(e)))
            self.say(f"  FAILED: {state} x {event}: {str(e).splitlines()[0]}")
            self.covered[(state, event)] += 1
            self.dev.events.clear()
            self._fresh()
            return state
        self.covered[(state, event)] += 1
        return state

    def _fresh(self) -> None:
        if self.dev is not None:
            self.dev.events.clear()  # counted by _fire
            self.close_device(self.dev)
        self.dev = self.new_device()
        self.devices += 1

    def walk(self, pairs: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """Fire every pair in ``pairs``; returns the pairs it could not reach."""
        todo = [p for p in pairs]
        failed_paths: Counter[tuple[str, str]] = Counter()
        try:
            while todo and self.events < self.max_events:
                if self.dev is None:
                    self._fresh()
                assert self.dev is not None
                here = self.dev.abstract_state()
                # a pair in the state we are in, else the nearest state with one
                mine = [p for p in todo if p[0] == here]
                if mine:
                    pair = mine[0]
                    self.say(f"  {here:<38} {pair[1]}")
                    # the device may have validated itself since: the pair is done only if fired in its state
                    if self._fire(pair[1]) == pair[0]:
                        todo.remove(pair)
                    continue
                routes = [(self.space.path_to(here, s), s) for s in {p[0] for p in todo}]
                routes = [(r, s) for r, s in routes if r is not None and failed_paths[(here, s)] < 2]
                if not routes:
                    if here == FRESH:  # nothing leads to what is left
                        break
                    self._fresh()
                    continue
                route, goal = min(routes, key=lambda rs: len(rs[0]))
                for event in route:
                    self.say(f"  {self.dev.abstract_state():<38} {event} (towards {goal})")
                    pair = (self._fire(event), event)
                    if pair in todo:
                        todo.remove(pair)
                    if self.dev.abstract_state() == goal:
                        break
                else:  # the route did not lead there (a surprise on the way): twice, and it is given up
                    failed_paths[(here, goal)] += 1
        finally:
            if self.dev is not None:
                self.dev.events.clear()
        return [p for p in pairs if p not in self.covered]

    def close(self) -> None:
        if self.dev is not None:
            self.close_device(self.dev)
            self.dev = None


def coverage_table(space: StateSpace, covered: Counter[tuple[str, str]],
                   wanted: tuple[tuple[str, str], ...] | None = None) -> list[str]:
    """One contract's (state, event) table: a count, '.' for a wanted pair not reached, 'x' for an
    impossible one (listed below the table with its reason), '!' for a pair reached that was
    thought impossible, '-' for a possible pair this run did not want, '~' for a pair of a state
    met only in passing that this run did not meet."""
    pairs = space.pairs
    wanted = pairs if wanted is None else wanted
    width = max(len(s) for s in STATES)
    cols = [e.replace("bad-upload:", "bad:").replace("broken-app:", "app:")[:13] for e in EVENTS]
    lines = [f"contract {space.name}:", f"{'state':<{width}}  " + " ".join(f"{c:>13}" for c in cols)]
    for s in STATES:
        cells = []
        for e in EVENTS:
            n = covered.get((s, e), 0)
            if space.impossible(s, e):
                cells.append("!" + str(n) if n else "x")
            elif s in space.spec.transient:
                cells.append(str(n) if n else "~")
            else:
                cells.append(str(n) if n else ("." if (s, e) in wanted else "-"))
        lines.append(f"{s:<{width}}  " + " ".join(f"{c:>13}" for c in cells))
    reached = sum(1 for p in pairs if covered.get(p))
    lines.append(f"{space.name}: reached {reached} of {len(pairs)} possible pairs ({len(space.reachable)} states x "
                 f"{len(EVENTS)} events); wanted this run: {len(wanted)}, reached "
                 f"{sum(1 for p in wanted if covered.get(p))}")  # fmt: skip
    reasons: dict[str, list[str]] = {}
    for (s, e), why in space.impossible_pairs.items():
        reasons.setdefault(why, []).append(s if e == "*" else f"{s} x {e}")
    lines.append("impossible (x), with the reason:")
    for why, where in reasons.items():
        lines.append(f"  {', '.join(where)}: {why}")
    if space.spec.transient:
        lines.append("met only in passing (~: not met this run), not planned:")
        lines += [f"  {s}: {why}" for s, why in space.spec.transient.items()]
    return lines


def walk_report(walker: Walker, what: str, wanted: tuple[tuple[str, str], ...], missed: list[Any], seconds: float
                ) -> list[str]:  # fmt: skip
    """What a walk reached, in how long, its coverage table and its failures' messages."""
    lines = [f"{what}: {len(wanted) - len(missed)} of {len(wanted)} reached in {walker.events} events on "
             f"{walker.devices} devices, {seconds:.0f} s"]  # fmt: skip
    lines += coverage_table(walker.space, walker.covered, wanted)
    lines += [f"\nFAILED: {state} x {event}: {message}" for state, event, message in walker.failures]
    return lines
