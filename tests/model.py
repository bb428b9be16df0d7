"""The update-safety model: a device (simulated, or the QEMU device; real fwup, real OpenSSH
client) under one boot contract, driven through (abstract state, event) pairs, with what must hold
after every event.

Used by tests/sim/test_model.py (a bounded sample in CI), bench/soak.py (every pair of every
contract, then random steps) and tests/vm/test_vm_model.py (a seeded sample on the QEMU device,
``--run-vm``: the same checks on real boots, through ``safety_model.vm_device.VmModelDevice``);
its parts are the package tests/safety_model/, one module each (below), and this module is what
they import. Each event drives the device and then waits until it settles (up,
ready, no update in progress), so every check runs on a device at rest.

- ``contracts``: what the model expects of each boot contract, one ``ContractSpec`` each
  (``CONTRACTS``): how it reads the boot env (slot, validated, trial, the forecast of the next
  boots), which variables validate, revert and the bootloader may write, the factory env, the
  pairs that are its own.
- ``device``: ``ModelledDevice`` — what the events and checks use of a device, the waits and the
  invariants of a device at rest (``check``) — and the simulated one, ``ModelDevice``: the running root
  is never written; every slot the next boots reach — the fallback after a trial included — is a
  whole firmware; ``status`` agrees with the env as the contract reads it; the app answers.
- ``changes``: what an event may change (``check_change``), compared on a snapshot of every boot
  env key, a hash of each slot's bytes, the app (version, pid) and ``status`` before and after.
- ``events``: the events (``RUNNERS``, ``fire``).
- ``space``: the states, the pairs that cannot happen (with the reason), refusal pairs, per
  contract (``space(name)``); ``walk``: ``Walker`` (plans a shortest path to each wanted state,
  fires the event), the coverage table, and a sample's seed (``SSHFWUP_MODEL_SEED``) and draw.
- ``vm_device``: ``VmModelDevice``, the QEMU device (sshfwup/vm) under uboot-bootcount, and its
  firmware pool (docs/vm.md, "The update-safety model on the QEMU device").
"""

from safety_model.changes import Result, check_change
from safety_model.contracts import CONTRACTS, DEFAULT_CONTRACT, BootView, ContractSpec, contract
from safety_model.device import (
    CONFIG, ModelDevice, ModelledDevice, ModelViolation, make_key, new_workdir, remove_workdir,
)  # fmt: skip
from safety_model.events import EVENTS, RUNNERS, fire
from safety_model.space import FRESH, STATES, StateSpace, space
from safety_model.walk import SEED_ENV, Walker, coverage_table, draw_pairs, sample_seed, walk_report

__all__ = [
    "CONFIG",
    "CONTRACTS",
    "DEFAULT_CONTRACT",
    "EVENTS",
    "FRESH",
    "RUNNERS",
    "SEED_ENV",
    "STATES",
    "BootView",
    "ContractSpec",
    "ModelDevice",
    "ModelledDevice",
    "ModelViolation",
    "Result",
    "StateSpace",
    "Walker",
    "check_change",
    "contract",
    "coverage_table",
    "draw_pairs",
    "fire",
    "make_key",
    "new_workdir",
    "remove_workdir",
    "sample_seed",
    "space",
    "walk_report",
]
