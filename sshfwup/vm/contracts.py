"""The boot contracts the QEMU device can be built for (``sshfwup vm build --contract``).

One row per contract: the U-Boot script shipped for boards of it (run unchanged after the
device's board parts: deploy/vm/board.cmd, and the script's board variables where its own are
another board's), the ``[boot]`` section appended to the device's /etc/sshfwup.toml, the values
deploy/vm/fwup.conf is built with, and, for fwup-ops, the ops archive compiled into the root
filesystem. The Raspberry Pi's tryboot cannot run under QEMU (no
Pi firmware): the VM proves fwup-ops over U-Boot, as Nerves' U-Boot boards use it; the tryboot
variant stays proven on the simulator (sshfwup/sim/tryboot.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from sshfwup.boot.backends import DEFAULT_CONTRACT
from sshfwup.vm.errors import VmError

__all__ = ["CONTRACTS", "DEFAULT_CONTRACT", "OPS_ARCHIVE", "VmContract", "vm_contract"]

#: where the fwup-ops device's ops archive goes in the root filesystem (its [boot] ops_archive)
OPS_ARCHIVE = "usr/share/fwup/ops.fw"


@dataclass(frozen=True)
class VmContract:
    """What the QEMU device needs for one boot contract (paths relative to the repository)."""

    name: str
    shipped_script: str  # deploy/uboot/<script>/boot.cmd, run unchanged after the board parts
    board_parts: tuple[str, ...]  # run before it: the commands that boot a slot, board variables
    boot_section: str | None  # a [boot] section appended to deploy/vm/sshfwup.toml; None: the default
    # deploy/vm/fwup.conf's defines for this contract (fwup reads them from its environment);
    # paths are relative to the repository and made absolute for fwup
    fwup_defines: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    fwup_paths: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    ops_conf: str | None = None  # compiled to /usr/share/fwup/ops.fw (fwup-ops)

    def fwup_variables(self, root: Path) -> dict[str, str]:
        return {**self.fwup_defines, **{k: str(root / v) for k, v in self.fwup_paths.items()}}


def _shipped_script(contract: str) -> str:
    """The U-Boot script sshfwup ships for a contract: deploy/uboot/<name without "uboot-">/boot.cmd."""
    return f"deploy/uboot/{contract.removeprefix('uboot-')}/boot.cmd"


_BOARD = "deploy/vm/board.cmd"
_NERVES_SCRIPT = _shipped_script("uboot-nerves")  # fwup-ops runs it too: Nerves' U-Boot boards
_NERVES_BOARD = (_BOARD, "deploy/vm/board-nerves.cmd")  # the VM's values for the BeagleBone ones
_NERVES_DEFINES = MappingProxyType({"NERVES_FW_AUTOVALIDATE": "0"})  # sshfwup validates, not U-Boot
_NERVES_FACTORY_ENV = "deploy/vm/contracts/factory-env-nerves.conf"

CONTRACTS: Mapping[str, VmContract] = MappingProxyType({
    c.name: c
    for c in (
        VmContract("uboot-bootcount", _shipped_script("uboot-bootcount"), (_BOARD,), None),
        VmContract("uboot-nerves", _NERVES_SCRIPT, _NERVES_BOARD, "deploy/vm/contracts/uboot-nerves.toml",
                   fwup_defines=_NERVES_DEFINES, fwup_paths=MappingProxyType({"FACTORY_ENV": _NERVES_FACTORY_ENV})),
        VmContract("fwup-ops", _NERVES_SCRIPT, _NERVES_BOARD, "deploy/vm/contracts/fwup-ops.toml",
                   fwup_defines=_NERVES_DEFINES,
                   fwup_paths=MappingProxyType({"FACTORY_ENV": _NERVES_FACTORY_ENV,
                                                "UPGRADE_TRIAL": "deploy/vm/contracts/trial-reboot-param.conf"}),
                   ops_conf="deploy/vm/ops.conf"),
    )
})  # fmt: skip


def vm_contract(name: str) -> VmContract:
    try:
        return CONTRACTS[name]
    except KeyError:
        raise VmError(f"unknown boot contract {name!r} for the QEMU device (known: {', '.join(CONTRACTS)})") from None
