"""The supervisor's part of ``[app] handoff`` (:mod:`sshfwup.app.handoff`): state and connections
from one version to the next during a swap, and back to the old version when the new one fails.

A new instance gets a hand-off channel at launch (:func:`open_channel`). While it gets ready, once
it asks (WANT), the old version's state and connections are relayed to it
(:func:`wait_ready_taking_over`; the wire protocol is :mod:`sshfwup.supervisor.handoff_relay`).
Once it is ready, the old version hears the verdict (:func:`settle`): DONE (close your copies) if
the new one took everything, else KEEP. A failed new version that still runs once the old one is
gone hands back what it took (:func:`can_hand_back`); a sender left waiting is told KEEP
(:func:`keep`). :mod:`sshfwup.supervisor.handoff_relay` is imported only when an app has
``[app] handoff`` on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio

from sshfwup import app as app_protocol
from sshfwup.config import AppConfig

from .errors import NotReady
from .instance import Child

if TYPE_CHECKING:  # imported when an app has [app] handoff on
    from . import handoff_relay

__all__ = ["can_hand_back", "keep", "lost_handoff", "open_channel", "settle", "wait_ready_taking_over"]


def open_channel(config: AppConfig, fds: list[int], env: dict[str, str]) -> handoff_relay.Channel | None:
    """A hand-off channel for a new instance: passed after the listening sockets (fd 3 +
    len(fds), not counted in LISTEN_FDS) and named in SSHFWUP_HANDOFF_FD. None when off."""
    if not config.handoff:
        return None
    from sshfwup.app import handoff

    from . import handoff_relay

    channel = handoff_relay.Channel()
    env[handoff.ENV_FD] = str(app_protocol.LISTEN_FDS_START + len(fds))
    env[handoff.ENV_TIMEOUT] = f"{config.handoff_timeout:g}"
    # A sender waits for DONE/KEEP until the receiver is ready (or given up on)
    env[handoff.ENV_VERDICT_TIMEOUT] = f"{config.ready_timeout + 2 * config.handoff_timeout + 5:g}"
    fds.append(channel.passed_fd())
    return channel


async def wait_ready_taking_over(
    wait_ready: Callable[[Child], Awaitable[None]], config: AppConfig, new: Child, donor: Child | None
) -> handoff_relay.Transfer | None:
    """``wait_ready(new)`` (:meth:`.readiness.Readiness.wait_ready`: passed in, as readiness
    imports the launcher, which imports this module), and meanwhile, once ``new`` asks (WANT), relay ``donor``'s state
    and connections to it. None without hand-off, else how it went (kept as ``new.taken``);
    the caller settles with the donor (:func:`settle`). Raises NotReady."""
    if new.handoff is None or donor is None:
        await wait_ready(new)
        return None
    from . import handoff_relay

    limits = handoff_relay.Limits(config.handoff_max_state, config.handoff_max_sockets, config.handoff_timeout)
    channel = new.handoff
    outcome: list[handoff_relay.Transfer] = []
    failure: list[NotReady] = []
    asked, done = anyio.Event(), anyio.Event()

    def nothing(problem: str) -> handoff_relay.Transfer:
        return handoff_relay.Transfer(False, donor.version, new.version, problem=problem)

    async def take() -> None:
        try:
            if not await handoff_relay.wait_want(channel):
                return
            asked.set()
            if donor.handoff is None or donor.handoff.broken or donor.exited.is_set() or donor.stopping:
                stopped = donor.exited.is_set() or donor.stopping
                what = "has stopped" if stopped else "has no usable hand-off channel"
                channel.tell(b"NONE", f"{donor.version} {what}")
                outcome.append(nothing(f"{donor.version} {what}; {new.version} starts clean"))
                return
            donor.owes_verdict = True
            transfer = await handoff_relay.relay(
                donor.handoff, channel, limits, sender_name=donor.version, receiver_name=new.version
            )
            donor.owes_verdict = transfer.taken  # else the relay told it KEEP already
            outcome.append(transfer)
        finally:
            done.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(take)
        try:
            await wait_ready(new)
        except NotReady as e:
            failure.append(e)
        if not failure and asked.is_set():  # READY=1 may overtake the TAKE on its way
            with anyio.move_on_after(config.handoff_timeout):
                await done.wait()
        tasks.cancel_scope.cancel()
    if failure:
        raise failure[0]
    if outcome:
        transfer = outcome[0]
    elif asked.is_set():
        transfer = nothing(f"{new.version} said it was ready before it took {donor.version}'s state")
    else:
        transfer = nothing(f"{new.version} became ready without asking for the hand-off")
    new.taken = transfer
    return transfer


async def settle(sender: Child, transfer: handoff_relay.Transfer, say: Callable[[str], Awaitable[None]]) -> None:
    """The receiver is ready: DONE to the sender (close your copies) if it took everything,
    else KEEP (everything is still yours); then say what moved."""
    if sender.owes_verdict and sender.handoff is not None:
        sender.handoff.tell(b"DONE" if transfer.taken else b"KEEP")
        sender.gave_away = transfer.taken
    sender.owes_verdict = False
    if transfer.taken:
        await say(
            f"{transfer.receiver} took over {transfer.summary()} from {transfer.sender}"
            f" (state version {transfer.state_version}) in {transfer.seconds:.3f} s"
        )
    else:
        await say(f"no hand-off: {transfer.problem}")


def can_hand_back(new: Child, old: Child) -> bool:
    """A failed new version can hand back what it holds: hand-off is on, it still runs and
    the old version no longer does (a running old version never gave anything away)."""
    return (
        new.handoff is not None
        and not new.handoff.broken
        and new.process.returncode is None
        and not new.exited.is_set()
        and (old.exited.is_set() or old.stopping or old.gave_away)
    )


def lost_handoff(failed: Child | None, donor: Child | None) -> str:
    """What a failed new version took with it when it cannot hand back (for the rollback line)."""
    if donor is not None or failed is None or failed.taken is None or not failed.taken.taken:
        return ""
    why = failed.describe_exit() if failed.exited.is_set() else "could not hand it back"
    return f"; lost what {failed.version} had taken over ({failed.taken.summary()}): it {why}"


def keep(sender: Child) -> None:
    """A sender waiting for the verdict of a hand-off that did not happen: KEEP (it still
    owns its state and connections)."""
    if sender.owes_verdict:
        sender.owes_verdict = False
        if sender.handoff is not None:
            sender.handoff.tell(b"KEEP")
