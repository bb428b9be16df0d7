"""The QEMU device tier (``--run-vm``): one VM directory per session (``SSHFWUP_VM_DIR`` to keep
and reuse one), one booted VM per module, driven through a blocking anyio portal."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal



def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mmdebstrap, chroot)"
    from sshfwup.vm.errors import ToolMissing
    from sshfwup.vm.tools import BUILD_TOOLS, RUN_TOOLS, require, uboot_rom

    try:
        require({**BUILD_TOOLS, **RUN_TOOLS}, what="the vm tier")
        uboot_rom()
    except ToolMissing as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def vm_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A built VM directory (the rootfs comes from /var/cache/sshfwup-vm when cached)."""
    if not request.config.getoption("--run-vm"):
        pytest.skip("vm: boots QEMU (minutes, root); run with --run-vm")
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from sshfwup.vm.image import VmDir, build_vm

    keep = os.environ.get("SSHFWUP_VM_DIR")
    path = Path(keep) if keep else tmp_path_factory.mktemp("vm")
    vm = VmDir(path.resolve())
    if not (keep and vm.disk.is_file()):
        build_vm(vm.path)
    yield vm.path
    if not keep:
        shutil.rmtree(vm.path, ignore_errors=True)


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as p:
        yield p
