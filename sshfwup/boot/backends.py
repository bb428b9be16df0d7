"""Which backend ``[boot] contract`` names: the registry of boot contracts.

Kept apart from :mod:`sshfwup.boot.contract` so the interface does not import its backends
(they import it).
"""

from __future__ import annotations

from .bootenv import BootEnv
from .contract import BootContract
from .uboot_bootcount import UBootBootcount
from .uboot_nerves import UBootNerves

__all__ = ["CONTRACTS", "DEFAULT_CONTRACT", "UnknownContract", "make_contract"]

_BACKENDS: dict[str, type[BootContract]] = {cls.name: cls for cls in (UBootBootcount, UBootNerves)}
CONTRACTS: tuple[str, ...] = tuple(_BACKENDS)
DEFAULT_CONTRACT = UBootBootcount.name


class UnknownContract(ValueError):
    """A contract name this version of sshfwup has no backend for."""


def make_contract(name: str, env: BootEnv, *, health_gated: bool = False) -> BootContract:
    """The backend named ``name``, speaking over ``env``."""
    try:
        cls = _BACKENDS[name]
    except KeyError:
        raise UnknownContract(f"unknown boot contract {name!r} (known: {', '.join(CONTRACTS)})") from None
    return cls(env, health_gated=health_gated)
