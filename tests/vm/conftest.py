"""The QEMU device's tests: the CI smoke (``test_vm_smoke.py``, marker ``vm_smoke``, in the
default run) and the full tier (``--run-vm``, marker ``vm``). One VM directory per session
(``SSHFWUP_VM_DIR`` to keep and reuse one), one booted VM per module, driven through a blocking
anyio portal. ``SSHFWUP_VM_SEED`` replays the random power-cut points of a run (its seed is
printed)."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from vmkit import build_vm_dir, missing_tools  # noqa: E402

SEED_ENV = "SSHFWUP_VM_SEED"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm_smoke: the QEMU device's CI smoke (tests/vm/test_vm_smoke.py; root, ~6 min)")


@pytest.fixture(scope="session")
def vm_seed(request: pytest.FixtureRequest) -> int:
    """The seed of this run's random power-cut points (``SSHFWUP_VM_SEED`` replays one), printed."""
    text = os.environ.get(SEED_ENV)
    try:
        seed = int(text) if text else random.SystemRandom().randrange(2**32)
    except ValueError:
        pytest.fail(f"{SEED_ENV}={text!r} is not an integer seed")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = f"vm power-cut seed: {seed} (replay: {SEED_ENV}={seed})"
    if reporter is not None:
        reporter.write_line(line)
    print(line)
    return seed


def _built_vm_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest,
                  contract: str) -> Iterator[Path]:  # fmt: skip
    if not request.config.getoption("--run-vm"):
        pytest.skip("vm: boots QEMU (minutes, root); run with --run-vm")
    if os.geteuid() != 0:
        pytest.skip("vm: needs root (mmdebstrap, chroot)")
    reason = missing_tools()
    if reason:
        pytest.fail(reason)
    path, kept, seconds = build_vm_dir(tmp_path_factory, contract)
    print(f"\nVM for boot contract {contract} ready in {seconds:.0f} s: {path}")
    yield path
    if not kept:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vm_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The full tier's built VM directory (the rootfs comes from /var/cache/sshfwup-vm when cached)."""
    yield from _built_vm_dir(tmp_path_factory, request, "uboot-bootcount")


@pytest.fixture(scope="module", params=["uboot-nerves", "fwup-ops"])
def contract_vm_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A VM directory built for each boot contract besides the default (``--contract``), one at a
    time: the tests using it run once per contract, on one VM each."""
    yield from _built_vm_dir(tmp_path_factory, request, request.param)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as p:
        yield p
