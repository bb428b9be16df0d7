"""What a device runs, asked over SSH: ``status --json`` (for ``sshfwup firmware diff --running``).

The device reports its running root slot and, from the boot environment, every slot's
firmware version and uuid. The uuid names the exact ``.fw`` the slot was written from (fwup's
meta-uuid is a hash of the archive's meta.conf), so the build machine can pick the matching
file and diff against it offline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import anyio
import asyncssh

from .client import connect_options, describe_connect_error

log = logging.getLogger(__name__)

__all__ = ["RemoteError", "RemoteUnreachable", "RunningFirmware", "fetch_status", "running_firmware"]

STATUS_COMMAND = "status --json"


class RemoteError(Exception):
    """The device could not be asked, or its answer does not say what it runs."""


class RemoteUnreachable(RemoteError):
    """No session with the device: not answering, refused, host key or login refused."""


@dataclass(frozen=True)
class RunningFirmware:
    host: str
    slot: str
    version: str | None
    uuid: str
    active: str | None  # the slot that boots next
    pending_reboot: bool
    update_in_progress: bool


async def fetch_status(
    host: str,
    *,
    port: int = 22,
    username: str | None = None,
    identities: list[str] | None = None,
    known_hosts: str | None | tuple[()] = (),
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Run ``status --json`` on the device and return the parsed answer.

    ``known_hosts``: ``()`` for asyncssh's default (``~/.ssh/known_hosts``), a file, or None
    to accept any host key (first contact).
    """
    try:
        with anyio.fail_after(timeout):
            async with asyncssh.connect(host, port, **connect_options(username, identities, known_hosts)) as conn:
                result = await conn.run(STATUS_COMMAND, check=False)
    except TimeoutError:
        raise RemoteUnreachable(f"{host}:{port}: no answer to `{STATUS_COMMAND}` within {timeout:.0f} s") from None
    except (OSError, asyncssh.Error) as e:
        raise RemoteUnreachable(await describe_connect_error(e, host, port, known_hosts)) from None
    stdout = result.stdout if isinstance(result.stdout, str) else (result.stdout or b"").decode("utf-8", "replace")
    stderr = result.stderr if isinstance(result.stderr, str) else (result.stderr or b"").decode("utf-8", "replace")
    if result.exit_status != 0:
        detail = (stderr or stdout).strip() or f"exit status {result.exit_status}"
        raise RemoteError(f"{host}: `{STATUS_COMMAND}` failed ({detail}); is the device running sshfwup?")
    try:
        status = json.loads(stdout)
    except json.JSONDecodeError as e:
        raise RemoteError(f"{host}: `{STATUS_COMMAND}` did not answer JSON ({e.msg})") from None
    if not isinstance(status, dict):
        raise RemoteError(f"{host}: `{STATUS_COMMAND}` answered {type(status).__name__}, not an object")
    return status


def running_firmware(status: dict[str, Any], host: str) -> RunningFirmware:
    """The running slot's firmware from a ``status --json`` answer."""
    slot = status.get("running_root")
    if not isinstance(slot, str) or not slot:
        raise RemoteError(f"{host}: the device cannot tell which slot it runs (running_root is {slot!r})")
    if status.get("boot_env_error"):
        raise RemoteError(f"{host}: the device cannot read its boot environment: {status['boot_env_error']}")
    slots = status.get("slots")
    info = slots.get(slot) if isinstance(slots, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("uuid"), str) or not info["uuid"]:
        raise RemoteError(
            f"{host}: the boot environment records no firmware uuid for the running slot {slot} "
            f"({slot}.nerves_fw_uuid is not set), so the running firmware cannot be identified"
        )
    version = info.get("version")
    active = status.get("active")
    return RunningFirmware(
        host=host,
        slot=slot,
        version=version if isinstance(version, str) else None,
        uuid=info["uuid"],
        active=active if isinstance(active, str) else None,
        pending_reboot=bool(status.get("pending_reboot")),
        update_in_progress=bool(status.get("update_in_progress")),
    )
