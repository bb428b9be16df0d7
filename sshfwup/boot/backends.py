"""Which backend ``[boot] contract`` names: the registry of boot contracts.

Kept apart from :mod:`sshfwup.boot.contract` so the interface does not import its backends
(they import it).
"""

from __future__ import annotations

from typing import Any

from .bootenv import BootEnv
from .contract import BootContract
from .fwup_ops import FwupOps, ops_contract
from .uboot_bootcount import UBootBootcount
from .uboot_nerves import UBootNerves

__all__ = ["CONTRACTS", "DEFAULT_CONTRACT", "UnknownContract", "make_contract"]

_BACKENDS: dict[str, type[BootContract]] = {cls.name: cls for cls in (UBootBootcount, UBootNerves, FwupOps)}
CONTRACTS: tuple[str, ...] = tuple(_BACKENDS)
DEFAULT_CONTRACT = UBootBootcount.name


class UnknownContract(ValueError):
    """A contract name this version of sshfwup has no backend for."""


def make_contract(name: str, env: BootEnv, *, health_gated: bool = False, config: Any = None) -> BootContract:
    """The backend named ``name``, speaking over ``env``. ``fwup-ops`` needs the configuration
    (:class:`sshfwup.config.Config`): its ops archive, disk and running-slot sources."""
    try:
        cls = _BACKENDS[name]
    except KeyError:
        raise UnknownContract(f"unknown boot contract {name!r} (known: {', '.join(CONTRACTS)})") from None
    if cls is FwupOps:
        if config is None:
            raise ValueError("the fwup-ops boot contract needs the configuration (its [boot] ops settings)")
        return ops_contract(env, health_gated=health_gated, config=config)
    return cls(env, health_gated=health_gated)
