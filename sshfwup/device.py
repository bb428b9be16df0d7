"""The device as the server sees it: configuration, boot env, lock, slots, app, reboot.

One object the server owns for its whole life and hands to updates, the pipeline and the status
commands, so none of them reaches for globals or re-reads configuration.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from sshfwup.boot.backends import make_contract
from sshfwup.boot.bootenv import ROLLED_BACK, BootEnv, BootEnvError, BootState, slot_state_var
from sshfwup.boot.contract import BootContract
from .config import Config
from sshfwup.update.lock import DeviceLock
from sshfwup.supervisor.logring import LogRing
from sshfwup.boot.slots import running_root

if TYPE_CHECKING:
    from sshfwup.update.journal import Journal
    from sshfwup.supervisor.client import SupervisorClient
    from sshfwup.supervisor.supervisor import Supervisor

log = logging.getLogger(__name__)

__all__ = ["Device", "ProgressTracker", "RebootRequest", "UpdateProgress"]


@dataclass(frozen=True)
class RebootRequest:
    reason: str


class _UploaderLike(Protocol):
    user: str
    fingerprint: str
    peer: str
    transport: str


@dataclass(frozen=True)
class UpdateProgress:
    """Where the update in progress stands, for ``status`` (a snapshot: replaced, never changed)."""

    user: str
    peer: str
    fingerprint: str
    transport: str
    stage: str = "receiving"  # the journal's stage names: receiving, applied, mounted, inspected, swapping, …
    received: int = 0  # bytes from the uploader so far
    percent: int | None = None  # fwup's progress, once it reported any
    from_slot: str | None = None
    from_version: str | None = None
    to_slot: str | None = None
    to_version: str | None = None  # known once fwup has applied the firmware
    started: float = 0.0  # time.time()

    def to_json(self) -> dict[str, Any]:
        return {
            "uploader": f"{self.user}@{self.peer}",
            "key": self.fingerprint,
            "transport": self.transport,
            "stage": self.stage,
            "received": self.received,
            "percent": self.percent,
            "from_slot": self.from_slot,
            "from_version": self.from_version,
            "to_slot": self.to_slot,
            "to_version": self.to_version,
            "started": round(self.started, 3),
            "elapsed": round(max(0.0, time.time() - self.started), 1),
        }


_PROGRESS_FIELDS = frozenset(UpdateProgress.__dataclass_fields__) - {"user", "peer", "fingerprint", "transport", "started"}


def _decile(progress: UpdateProgress) -> int | None:
    return None if progress.percent is None else progress.percent // 10


class ProgressTracker:
    """The live state of the one update in progress; the update code drives it:

        device.progress.begin(uploader, from_slot="a", from_version="1.0.0")   # lock taken
        device.progress.set(received=n)            # each chunk from the uploader
        device.progress.set(percent=p)             # each fwup progress event
        device.progress.set(stage="applied", to_slot="b", to_version="2.0.0")
        device.progress.end()                      # lock released (also on failure)

    ``set`` before ``begin`` or after ``end`` is ignored, so a late event cannot resurrect a
    finished update. A stage change, and every 10 % of fwup's progress, also go to the
    service manager as ``STATUS=`` (what ``systemctl status`` shows).
    """

    def __init__(self, notify: Any = None) -> None:
        self._notify = notify
        self.current: UpdateProgress | None = None

    def begin(self, uploader: _UploaderLike, **fields: Any) -> None:
        self._check(fields)
        self.current = UpdateProgress(
            uploader.user, uploader.peer, uploader.fingerprint, uploader.transport, started=time.time(), **fields
        )
        self._tell(None)

    def set(self, **changes: Any) -> None:
        self._check(changes)
        before = self.current
        if before is None:
            return
        self.current = replace(before, **changes)
        self._tell(before)

    def end(self) -> None:
        self.current = None

    @staticmethod
    def _check(fields: dict[str, Any]) -> None:
        unknown = set(fields) - _PROGRESS_FIELDS
        if unknown:
            raise TypeError(f"unknown progress fields: {sorted(unknown)}")

    def _tell(self, before: UpdateProgress | None) -> None:
        now = self.current
        if self._notify is None or now is None:
            return
        if before is not None and before.stage == now.stage and _decile(before) == _decile(now):
            return  # bytes alone change too often for the service manager
        text = f"update from {now.user}@{now.peer}: {now.stage}"
        if now.stage == "receiving" and now.percent is not None:
            text += f", fwup {now.percent}%"
        self._notify(text)


class Device:
    """``bootenv`` is the boot contract (:mod:`sshfwup.boot.contract`): the only way to the boot
    state. Given a plain :class:`BootEnv` adapter, the device wraps it in ``[boot] contract``'s
    backend; anything else (a contract, a test's stand-in) is used as it is."""

    def __init__(self, config: Config, *, bootenv: BootEnv | BootContract | None = None) -> None:
        self.config = config
        if bootenv is None or isinstance(bootenv, BootEnv):
            env = bootenv or BootEnv(
                config.device.fw_env_config, printenv=config.device.fw_printenv, setenv=config.device.fw_setenv
            )
            # An app is supervised: the server validates a first boot only once it proved healthy.
            bootenv = make_contract(config.boot.contract, env, health_gated=bool(config.app.command), config=config)
        self.bootenv: BootContract = bootenv
        self.lock = DeviceLock(config.server.lock_file)
        # In the supervisor process: the app's owner. In the SSH front: None, and ``app`` asks the
        # supervisor over the local socket instead (None there too when no app is configured).
        self.supervisor: Supervisor | None = None
        self.app: SupervisorClient | None = None
        self.journal: Journal | None = None
        self.reboot_requested: RebootRequest | None = None
        self._reboot_event = anyio.Event()
        self._last_outcome: dict[str, Any] | None = None
        self.last_outcome_at = 0.0  # time.time() it was set: the newer of the two processes' counts
        self.status_relay: Callable[[str], None] | None = None
        self.progress = ProgressTracker(self.notify_status)
        self.logs = LogRing()  # the daemon attaches it to the root logger
        # Changes with every start of the server (so with every boot): `upload --wait` tells a
        # device that came back from one that has not gone down yet.
        self.instance = os.urandom(8).hex()  # (not `secrets`: it loads OpenSSL's libcrypto)
        self.server_pid = os.getpid()  # the supervisor's (the SSH front learns it from hello)
        self.started = time.time()

    def update_progress(self) -> UpdateProgress | None:
        """The update in progress, with the stage and target the journal knows (the pipeline
        records mounted → inspected → swapping → observing → hot/reboot there), or None."""
        now = self.progress.current
        if now is None:
            return None
        record = self.journal.current if self.journal is not None else None
        # A record advanced during this update (fwup's "receiving" is ours to tell, with bytes).
        if record is not None and record.stage != "receiving" and record.updated >= now.started:
            now = replace(
                now,
                stage=record.stage,
                to_slot=now.to_slot or record.to_slot,
                to_version=now.to_version or record.to_version,
            )
        return now

    def slot_mount_point(self, slot: str) -> Path:
        """Where a slot other than the running root is mounted read-only (inspection, a hot swap)."""
        return self.config.server.run_dir / "slots" / slot

    def running_root(self) -> str | None:
        """The slot mounted as the root filesystem (from the mount table), or None."""
        return running_root(self.config.device.root_mount, self.config.device.slots)

    @property
    def last_outcome(self) -> dict[str, Any] | None:
        """How the last update ended (``ok``, ``verdict``), as ``status`` shows it."""
        return self._last_outcome

    @last_outcome.setter
    def last_outcome(self, outcome: dict[str, Any] | None) -> None:
        self._last_outcome = outcome
        self.last_outcome_at = time.time()

    @property
    def rebooting(self) -> str | None:
        return self.reboot_requested.reason if self.reboot_requested else None

    def notify_status(self, text: str) -> None:
        """A STATUS= line for the service manager (systemd shows it in `systemctl status`)."""
        if self.status_relay is not None:
            self.status_relay(text)  # the SSH front: only the service's main process may notify
            return
        from .app import notify

        notify(f"STATUS={text}")

    async def boot_state(self) -> BootState:
        return await self.bootenv.state()

    async def give_up_slot(self, running: str, failed: str, failed_version: str) -> str:
        """The app of the firmware in slot ``failed`` failed after a hot swap: the boot env goes
        back to ``running`` with ``failed`` marked rolled back, in one write — unless ``[app]
        revert_on_failure`` is false (it is tried again at the next boot). Says what happened."""
        if not self.config.app.revert_on_failure:
            return f"slot {failed} ({failed_version}) still boots next ([app] revert_on_failure = false)"
        try:
            await self.bootenv.revert_to(running, also={slot_state_var(failed): ROLLED_BACK})
        except BootEnvError as e:
            return f"REVERTING THE BOOT ENV FAILED ({e}): slot {failed} would boot next"
        return f"boot env reverted to slot {running}"

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
