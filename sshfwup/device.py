"""The device as the server sees it: configuration, boot env, lock, slots, app, reboot.

One object the server owns for its whole life and hands to updates, the pipeline and the status
commands, so none of them reaches for globals or re-reads configuration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from .bootenv import BootEnv, BootState
from .config import Config
from .lock import DeviceLock
from .slots import running_root

if TYPE_CHECKING:
    from .journal import Journal
    from .supervisor import Supervisor

log = logging.getLogger(__name__)

__all__ = ["Device", "RebootRequest"]


@dataclass(frozen=True)
class RebootRequest:
    reason: str


class Device:
    def __init__(self, config: Config, *, bootenv: BootEnv | None = None) -> None:
        self.config = config
        self.bootenv = bootenv or BootEnv(
            config.device.fw_env_config, printenv=config.device.fw_printenv, setenv=config.device.fw_setenv
        )
        self.lock = DeviceLock(config.server.lock_file)
        self.supervisor: Supervisor | None = None
        self.journal: Journal | None = None
        self.reboot_requested: RebootRequest | None = None
        self._reboot_event = anyio.Event()
        self.last_outcome: dict[str, Any] | None = None

    def running_root(self) -> str | None:
        """The slot mounted as the root filesystem (from the mount table), or None."""
        return running_root(self.config.device.root_mount, self.config.device.slots)

    def notify_status(self, text: str) -> None:
        """A STATUS= line for the service manager (systemd shows it in `systemctl status`)."""
        from .app import notify

        notify(f"STATUS={text}")

    async def boot_state(self) -> BootState:
        return await self.bootenv.state()

    def request_reboot(self, reason: str) -> None:
        """Ask the server to reboot once the uploader's channel is closed (it owns the timing)."""
        if self.reboot_requested is None:
            log.info("reboot requested: %s", reason)
            self.reboot_requested = RebootRequest(reason)
            self._reboot_event.set()

    async def wait_reboot_request(self) -> RebootRequest:
        await self._reboot_event.wait()
        assert self.reboot_requested is not None
        return self.reboot_requested

    async def reboot(self) -> None:
        """Run the configured reboot command; on a device this does not return for long."""
        cmd = list(self.config.device.reboot_command)
        log.warning("rebooting: %s", " ".join(cmd))
        result = await anyio.run_process(cmd, check=False)
        if result.returncode != 0:
            log.error(
                "reboot command failed (status %d): %s",
                result.returncode,
                (result.stderr or result.stdout).decode(errors="replace").strip(),
            )
