"""The U-Boot environment, read and written with libubootenv's ``fw_printenv``/``fw_setenv``.

``<slot>.nerves_fw_version`` etc. (fwup's metadata, Nerves names) describe each slot under every
contract; ``<slot>.sshfwup_state`` is sshfwup's own mark. What the bootloader's variables mean
(``nerves_fw_active``, ``nerves_fw_validated``, ``upgrade_available``/``bootcount``, …) is the boot
contract's business: :mod:`sshfwup.boot.contract` and its backends.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio

log = logging.getLogger(__name__)

__all__ = [
    "INCOMPLETE",
    "ROLLED_BACK",
    "SLOT_STATE",
    "BootEnv",
    "BootEnvError",
    "BootState",
    "SlotInfo",
    "other_slot",
    "slot_state_var",
]


class BootEnvError(Exception):
    """The boot environment could not be read or written."""


def other_slot(slot: str) -> str:
    return {"a": "b", "b": "a"}[slot]


# sshfwup's own record of a slot's content, in the boot env beside fwup's <slot>.nerves_fw_*:
# "incomplete" from before fwup writes a byte to the slot until fwup's on-finish (which unsets it
# in the same environment write that switches to the slot); "rolled-back" once a firmware failed
# and the env went back to the other slot. Unset: the slot holds what <slot>.nerves_fw_* describe.
SLOT_STATE = "sshfwup_state"
INCOMPLETE = "incomplete"
ROLLED_BACK = "rolled-back"


def slot_state_var(slot: str) -> str:
    return f"{slot}.{SLOT_STATE}"


@dataclass(frozen=True)
class SlotInfo:
    slot: str
    version: str | None
    uuid: str | None
    platform: str | None
    product: str | None
    state: str | None = None  # INCOMPLETE, ROLLED_BACK or None (whole, as described)

    @property
    def usable(self) -> bool:
        """Holds a whole firmware that has not been rolled back: something to boot."""
        return bool(self.version) and self.state is None


@dataclass(frozen=True)
class BootState:
    """What the boot environment says (never where we are running from: see ``slots``)."""

    active: str | None
    validated: bool
    slots: Mapping[str, SlotInfo]
    raw: Mapping[str, str]
    # A firmware boots (or will boot) on trial: the bootloader falls back unless it validates.
    trial: bool = False
    contract: str = "uboot-bootcount"
    # What the operator must hear about this contract and environment (status, log, start-up).
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "BootState":
        """The default contract's reading (``uboot-bootcount``); backends build their own states."""
        active = env.get("nerves_fw_active")
        validated = env.get("nerves_fw_validated") == "1"
        if "nerves_fw_validated" not in env and "upgrade_available" in env:
            validated = env.get("upgrade_available") == "0"
        return cls(active if active in ("a", "b") else None, validated, cls.slot_infos(env), dict(env))

    @staticmethod
    def slot_infos(env: Mapping[str, str]) -> dict[str, SlotInfo]:
        """What ``<slot>.nerves_fw_*`` (fwup's metadata) and sshfwup's marks say of each slot:
        the same under every boot contract."""
        return {
            s: SlotInfo(
                s,
                env.get(f"{s}.nerves_fw_version") or None,
                env.get(f"{s}.nerves_fw_uuid") or None,
                env.get(f"{s}.nerves_fw_platform") or None,
                env.get(f"{s}.nerves_fw_product") or None,
                env.get(slot_state_var(s)) or None,
            )
            for s in ("a", "b")
        }

    def version(self, slot: str) -> str | None:
        return self.slots[slot].version


class BootEnv:
    """Adapter over the real tools; the simulator and tests point it at a disk image's config.

    It reads and writes variables and knows no meaning: what they mean to the bootloader is a
    boot contract's (:mod:`sshfwup.boot.contract`). The ``*_sync`` methods serve the simulator's
    bootloader; the server uses the async ones, which run the same code in a worker thread.
    """

    def __init__(
        self, config: Path, *, printenv: str = "fw_printenv", setenv: str = "fw_setenv", timeout: float = 10.0
    ) -> None:
        self.config = Path(config)
        self.printenv = printenv
        self.setenv = setenv
        self.timeout = timeout

    def read_sync(self) -> dict[str, str]:
        """All variables. Raises BootEnvError when the block is missing or its CRC is wrong."""
        env: dict[str, str] = {}
        for line in self._run([self.printenv, "-c", str(self.config)]).splitlines():
            name, sep, value = line.partition("=")
            if sep:
                env[name] = value
        return env

    def write_sync(self, values: Mapping[str, str | None]) -> None:
        """Set (or, with ``None`` or "", remove) several variables in one environment write."""
        if not values:
            return
        lines = []
        for name, value in values.items():
            if not name or "=" in name or any(c.isspace() for c in name):
                raise BootEnvError(f"invalid U-Boot variable name {name!r}")
            if value is not None and ("\n" in value or "\0" in value):
                raise BootEnvError(f"value of {name} must be a single line")
            lines.append(f"{name}={value or ''}\n")
        # libubootenv's script syntax: one name=value per line; "name=" deletes the variable.
        self._run([self.setenv, "-c", str(self.config), "-s", "-"], stdin="".join(lines).encode())
        log.info("boot env: %s", ", ".join(f"{k}={v if v else '(unset)'}" for k, v in values.items()))

    async def read(self) -> dict[str, str]:
        return await anyio.to_thread.run_sync(self.read_sync)

    async def write(self, values: Mapping[str, str | None]) -> None:
        await anyio.to_thread.run_sync(self.write_sync, values)

    def _run(self, argv: list[str], stdin: bytes | None = None) -> str:
        try:
            proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=self.timeout, check=False)
        except FileNotFoundError:
            raise BootEnvError(f"{argv[0]} not found: install libubootenv's tools (fw_printenv/fw_setenv)") from None
        except subprocess.TimeoutExpired:
            raise BootEnvError(f"{argv[0]} did not finish within {self.timeout:g} s") from None
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).decode(errors="replace").strip() or f"status {proc.returncode}"
            raise BootEnvError(f"{Path(argv[0]).name} -c {self.config} failed: {detail}")
        return proc.stdout.decode("utf-8", errors="replace")
