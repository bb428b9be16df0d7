"""The one door to every change of the device's state.

An upload on any transport, the ``reboot``, ``revert`` and ``validate`` commands, the device's own
boot validation and its crash-loop rollback all change what the device runs or boots next. Each
goes through :func:`state_change`, which takes the device's update lock (an ``flock``: see
``lock.py``) and refuses, with the same message naming the holder, while another change holds it
or a reboot is already on its way. Nothing else in sshfwup writes the boot state, starts fwup or
reboots; ``tests/update/test_door.py`` enumerates the commands and transports to keep it so.

Who waits and who is refused:

- an operator's change (an upload, a command) is refused at once while another operator's
  change holds the lock, and waits up to :data:`BRIEF_HOLDER_WAIT` for the device's own brief
  work (boot validation right after a boot), so the device never answers "busy" to an upload
  because of itself;
- the device's own work (``own_work=True``) waits for any holder up to its ``wait``: it must
  happen, only later;
- once a reboot has been requested, no operator's change starts (the reboot would cut it); the
  device's own work goes on (it may be what asked for the reboot);
- ``reboot --force`` is the one way past a holder, logged with who asked.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

from .lock import DeviceBusy, LockHolder

if TYPE_CHECKING:
    from sshfwup.device import Device

log = logging.getLogger(__name__)

__all__ = ["BRIEF_HOLDER_WAIT", "DeviceBusy", "RebootPending", "acquire", "force_reboot_past", "state_change"]

BRIEF_HOLDER_WAIT = 15.0  # s: the longest an operator's change waits for the device's own brief work
_POLL = 0.1


class RebootPending(DeviceBusy):
    """A reboot has been requested: no change starts that the reboot would cut."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        holder = LockHolder(os.getpid(), f"a reboot ({reason})", time.time())
        super().__init__(holder)
        self.args = (f"the device is about to reboot ({reason}); try again once it is back",)


async def acquire(device: Device, who: str, *, own_work: bool = False, wait: float | None = None) -> None:
    """Take the update lock for ``who``, or raise :class:`DeviceBusy` (whose message names the
    holder). ``own_work``: the device's own work, held as brief, which waits for any holder up
    to ``wait`` seconds (default 600)."""
    limit = (600.0 if wait is None else wait) if own_work else BRIEF_HOLDER_WAIT
    deadline = anyio.current_time() + limit
    while True:
        # The device's own work goes on until the reboot comes (it may be what asked for it).
        if device.reboot_requested is not None and not own_work:
            raise RebootPending(device.reboot_requested.reason)
        try:
            device.lock.acquire(who, brief=own_work)
            return
        except DeviceBusy as e:
            waits = own_work or (e.holder is not None and e.holder.brief)
            if not waits or anyio.current_time() > deadline:
                log.warning("refused %s: %s", who, e)
                raise
            log.info("%s waits for %s", who, e.holder.who if e.holder else "the lock")
        await anyio.sleep(_POLL)


@asynccontextmanager
async def state_change(
    device: Device, who: str, *, own_work: bool = False, wait: float | None = None
) -> AsyncIterator[None]:
    """One change of the device's state under the update lock (see the module docstring)."""
    await acquire(device, who, own_work=own_work, wait=wait)
    try:
        yield
    finally:
        device.lock.release()


def force_reboot_past(device: Device, who: str) -> LockHolder | None:
    """``reboot --force``: the holder a forced reboot goes past (None: none), logged with who asked."""
    holder = device.lock.holder() if device.lock.busy() else None
    if holder is not None:
        log.warning("reboot forced by %s past %s", who, holder.describe())
    return holder
