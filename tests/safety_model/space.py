"""The model's state space, per boot contract: the abstract states, the pairs that cannot happen
(with the reason), the refusal pairs, and the edges a walk plans its way along.

The common part holds under every contract; a contract adds its own impossible pairs and edges
(``ContractSpec.impossible``/``edges``, tests/model/contracts.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import cache

from .contracts import CONTRACTS, DEFAULT_CONTRACT, ContractSpec
from .events import EVENTS

STATES = tuple(f"{p}/{v}/other-{o}" for p in ("settled", "pending") for v in ("validated", "unvalidated")
               for o in ("empty", "whole", "incomplete", "rolled-back"))  # fmt: skip
FRESH = "settled/validated/other-empty"

_NO_FALLBACK = ("an unvalidated firmware boots only with a whole fallback: fwup switches only from a validated "
                "slot (upgrade.a/b require nerves_fw_validated=1) and sshfwup writes no slot while the running "
                "firmware is unvalidated (precheck), so the slot it came from stays whole")  # fmt: skip
_PENDING_OTHER = ("pending means the env names the slot that is not running as the next boot, and it names only "
                  "a slot fwup's on-finish just made whole (or revert's whole target)")  # fmt: skip
_PENDING_VALIDATED = ("nothing validates a firmware that has not booted: fwup's switch and a revert to an unproven "
                      "slot set nerves_fw_validated=0, and validate refuses while a reboot is pending")  # fmt: skip


def _common_impossible() -> dict[tuple[str, str], str]:
    """(state, event) -> why it cannot happen under any contract; "*": the state is unreachable."""
    out: dict[tuple[str, str], str] = {}
    for s in STATES:
        pending, validated, other = s.split("/")
        if pending == "pending" and validated == "validated":
            out[(s, "*")] = _PENDING_VALIDATED
        elif pending == "pending" and other != "other-whole":
            out[(s, "*")] = _PENDING_OTHER
        elif pending == "settled" and validated == "unvalidated" and other != "other-whole":
            out[(s, "*")] = _NO_FALLBACK
    return out


# Expected results of events used to move between states (a shortest path is planned over them;
# the actual state is always read back, so a surprise only costs a detour).
_EDGES: dict[str, dict[str, str]] = {
    "settled/validated/other-empty": {"bad-upload:flipped": "settled/validated/other-incomplete",
                                      "broken-app:never_ready": "settled/validated/other-rolled-back",
                                      "hot-upload": "pending/unvalidated/other-whole"},
    "settled/validated/other-incomplete": {"hot-upload": "pending/unvalidated/other-whole"},
    "settled/validated/other-rolled-back": {"hot-upload": "pending/unvalidated/other-whole"},
    "settled/validated/other-whole": {"bad-upload:flipped": "settled/validated/other-incomplete",
                                      "broken-app:never_ready": "settled/validated/other-rolled-back",
                                      "hot-upload": "pending/unvalidated/other-whole"},
    "pending/unvalidated/other-whole": {"reboot": "settled/unvalidated/other-whole",
                                        "revert": "settled/validated/other-whole"},
    "settled/unvalidated/other-whole": {"validate": "settled/validated/other-whole"},
}  # fmt: skip

# Refusals: the pairs where the event is refused before anything is written (what issue 28's bug
# hid in). The CI sample walks all of these for the default contract.
_UPLOADS = ("hot-upload", "reboot-upload", "bad-upload:garbage", "bad-upload:flipped", "bad-upload:wrong-platform",
            "cut-upload", "slow-tail-upload", "broken-app:never_ready", "broken-app:crash_after", "same-upload")  # fmt: skip


def is_refusal(state: str, event: str) -> bool:
    pending, validated, other = state.split("/")
    if event in ("bad-upload:garbage", "bad-upload:wrong-platform"):
        return True
    if event in _UPLOADS and (pending == "pending" or validated == "unvalidated"):
        return True
    if event == "revert":
        return pending == "settled" and other != "other-whole"
    if event == "validate":
        return pending == "pending" or validated == "validated"
    return False


@dataclass(frozen=True)
class StateSpace:
    """The (state, event) pairs one contract defines, and how to walk to them."""

    spec: ContractSpec
    impossible_pairs: dict[tuple[str, str], str]
    edges: dict[str, dict[str, str]]

    @property
    def name(self) -> str:
        return self.spec.name

    def impossible(self, state: str, event: str) -> str | None:
        return self.impossible_pairs.get((state, "*")) or self.impossible_pairs.get((state, event))

    @property
    def reachable(self) -> tuple[str, ...]:
        """The states a walk can be planned into (neither impossible nor met only in passing)."""
        return tuple(s for s in STATES if (s, "*") not in self.impossible_pairs and s not in self.spec.transient)

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple((s, e) for s in self.reachable for e in EVENTS if not self.impossible(s, e))

    @property
    def refusal_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(p for p in self.pairs if is_refusal(*p))

    @property
    def specific_pairs(self) -> tuple[tuple[str, str], ...]:
        return tuple(p for p in self.spec.specific if not self.impossible(*p))

    def path_to(self, start: str, goal: str) -> list[str] | None:
        """The shortest list of events from ``start`` to ``goal`` over the edges (None: no path)."""
        seen: dict[str, list[str]] = {start: []}
        queue = deque([start])
        while queue:
            s = queue.popleft()
            if s == goal:
                return seen[s]
            for event, nxt in self.edges.get(s, {}).items():
                if nxt not in seen:
                    seen[nxt] = [*seen[s], event]
                    queue.append(nxt)
        return None


@cache
def space(contract_name: str = DEFAULT_CONTRACT) -> StateSpace:
    spec = CONTRACTS[contract_name]
    edges = {s: dict(e) for s, e in _EDGES.items()}
    for s, more in spec.edges.items():
        edges.setdefault(s, {}).update(more)
    impossible = {k: v for k, v in _common_impossible().items() if k[0] not in spec.transient}
    return StateSpace(spec, {**impossible, **spec.impossible}, edges)
