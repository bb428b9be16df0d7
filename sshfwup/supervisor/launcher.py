"""Start an instance of the app, own its process until it is gone, and stop it.

Each instance runs with cwd = ``root/app_dir`` (``app_dir`` is absolute inside the root
filesystem), in its room (:mod:`sshfwup.supervisor.room`: its own user, capabilities and cgroup, a clean
environment), plus ``[app] env`` (``{root}`` and ``{app_dir}``
are substituted there and in ``command``), ``PYTHONPATH`` starting with the app dir,
``SSHFWUP_SLOT``, ``SSHFWUP_VERSION``, ``SSHFWUP_APP_ROOT`` (the root), ``SSHFWUP_APP_DIR``,
``NOTIFY_SOCKET`` and ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``. It is started through the
exec shim in :mod:`sshfwup.app` (``pass_fds`` keeps the parent's fd numbers; the shim moves them
to 3.. and sets ``LISTEN_PID`` in the process that then execs the app), in a session of its own
so that SIGKILL reaches its whole process group.

Every app process carries ``SSHFWUP_SUPERVISOR=<marker>`` in its environment and dies with the
supervisor (``PR_SET_PDEATHSIG``); :func:`kill_strays` removes what an earlier server left behind.
The marker must be the same for every run of one device's server and unique to it. Processes an
instance leaves behind when its main process exits (a multiprocessing resource tracker, an
orphaned worker) get SIGTERM and the rest of the drain time to exit on their own, then SIGKILL;
an instance counts as gone — and its sockets are released — only once all of them are.

Stopping an instance is SIGTERM, ``drain_timeout`` to finish its requests and exit, then SIGKILL
to its process group (:meth:`Launcher.stop`).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc

from sshfwup import app as app_protocol
from sshfwup.config import AppConfig
from sshfwup.system import procs

from . import handoff_swap, logring, probes, room
from .errors import NotReady
from .instance import LOGGER, AppSource, Child, Roster
from .listeners import Listener

__all__ = [
    "HEALTH_SOCKET_NAME",
    "INSTANCE_VARIABLE",
    "MARKER_VARIABLE",
    "InstanceIds",
    "Launcher",
    "kill_strays",
    "marked_processes",
]

log = logging.getLogger(LOGGER)

MARKER_VARIABLE = "SSHFWUP_SUPERVISOR"
INSTANCE_VARIABLE = "SSHFWUP_INSTANCE"  # one value per started process: finds what it left behind
HEALTH_SOCKET_NAME = "health"
_INHERITED_PROTOCOL_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET")
_EXEC_SHIM = Path(app_protocol.__file__)
_KILL_WAIT = 5.0  # a SIGKILLed process is gone well within this
_OUTPUT_DRAIN = 1.0  # after an exit, the app's last output lines still get this long to arrive
_app_output = logging.getLogger(logring.APP_LOGGER)


def marked_processes(marker: str) -> list[int]:
    """Pids of the processes whose environment carries ``SSHFWUP_SUPERVISOR=<marker>``."""
    return procs.processes_with(f"{MARKER_VARIABLE}={marker}")


def kill_strays(marker: str, *, timeout: float = 2.0) -> list[int]:
    """SIGKILL app processes left behind by an earlier server with the same marker.

    Normally none exist (apps die with their server); this covers a server that was killed
    while an app had detached itself. Waits up to ``timeout`` for them to be gone, so that their
    listening sockets are free again. Returns the pids it killed.
    """
    pids = list(procs.end_processes_with(f"{MARKER_VARIABLE}={marker}", timeout=timeout).signalled)
    if pids:
        log.warning("killed %d application process(es) left by an earlier server: %s", len(pids), pids)
    return pids


class InstanceIds:
    """``SSHFWUP_INSTANCE`` values: unique to each process started, across supervisors too."""

    def __init__(self, marker: str) -> None:
        self._marker = marker
        self._token = os.urandom(4).hex()  # instance ids stay unique across supervisors
        self._spawned = 0

    def next(self) -> str:
        self._spawned += 1
        return f"{self._marker}/{os.getpid()}.{self._token}/{self._spawned}"


class Launcher:
    """Starts instances on the sockets it is given, owns each process until it is gone (one task
    per instance in the supervisor's task group), and stops them."""

    def __init__(
        self,
        config: AppConfig,
        roster: Roster,
        listeners: tuple[Listener, ...],
        tasks: anyio.abc.TaskGroup,
        *,
        marker: str,
        ids: InstanceIds,
        on_exit: Callable[[Child], None],
    ) -> None:
        """``on_exit``: called with each instance once it is gone (its sockets, cgroup and
        leftovers too), unless the supervisor's task group was cancelled meanwhile."""
        self._config = config
        self._roster = roster
        self._listeners = listeners
        self._tasks = tasks
        self._marker = marker
        self._ids = ids
        self._on_exit = on_exit

    async def launch(
        self, source: AppSource, *, sockets: tuple[socket.socket, ...], restarts: int, failures: int,
        donor: Child | None = None,
    ) -> Child:
        """Start one instance with ``sockets`` (one per listener) at fds 3.. (raises NotReady)."""
        config = self._config
        source = AppSource(source.root.absolute(), source.slot, source.version)  # cwd moves
        app_dir = source.app_dir(config.app_dir)
        if not app_dir.is_dir():
            raise NotReady(f"could not be started: the application directory {app_dir} does not exist")
        instance_id = self._ids.next()
        try:
            app_room = room.prepare_room(config, instance_id)
        except room.RoomError as e:
            raise NotReady(f"could not be started: {e}") from None
        notify, notify_address = probes.open_notify_socket()
        health = probes.open_health_socket() if config.ready in ("http", "tcp") else None
        passed = [*sockets, *([health] if health else [])]
        names = [listener.name for listener in self._listeners] + ([HEALTH_SOCKET_NAME] if health else [])
        fds = [sock.fileno() for sock in passed]
        env = self._environment(source, app_dir, instance_id, notify_address, names, app_room)
        channel = handoff_swap.open_channel(config, fds, env)
        command = [_substitute(arg, source.root, app_dir) for arg in config.command]
        # The shim moves the fds to 3.., sets LISTEN_PID to its own pid and PR_SET_PDEATHSIG,
        # then execs the command: pass_fds alone keeps the parent's fd numbers.
        argv = [sys.executable, "-I", "-S", str(_EXEC_SHIM), "--sshfwup-exec", str(os.getpid()),
                ",".join(map(str, fds)), *app_room.shim_options(), "--", *command]  # fmt: skip
        try:
            process = await anyio.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=app_dir, env=env,
                pass_fds=fds, start_new_session=True,  # fmt: skip
            )
        except OSError as e:
            notify.close()
            if health:
                health.close()
            if channel:
                channel.close()
            raise NotReady(f"could not be started: {e.strerror or e}") from e
        child = Child(process, source, instance_id=instance_id, sockets=sockets, notify=notify, health=health,
                      restarts=restarts, failures=failures)  # fmt: skip
        if channel is not None:
            channel.spawned()
            child.handoff = channel
            if donor is None:
                channel.tell(b"NONE", "nothing to hand over: a plain start")
        child.cgroup = app_room.cgroup
        self._roster.children.add(child)
        await self._tasks.start(self._run, child)
        log.info("started %s from slot %s: pid %d", source.version, source.slot, child.pid)
        return child

    def _environment(
        self, source: AppSource, app_dir: Path, instance_id: str, notify_address: str, names: list[str],
        app_room: room.Room,
    ) -> dict[str, str]:
        env = {k: v for k, v in app_room.environment(os.environ).items() if k not in _INHERITED_PROTOCOL_VARIABLES}
        env.update((key, _substitute(value, source.root, app_dir)) for key, value in self._config.env)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir), env.get("PYTHONPATH", "")]))
        env.update(
            SSHFWUP_SLOT=source.slot,
            SSHFWUP_VERSION=source.version,
            SSHFWUP_APP_ROOT=str(source.root),
            SSHFWUP_APP_DIR=str(app_dir),
            NOTIFY_SOCKET=notify_address,
        )
        env[MARKER_VARIABLE] = self._marker
        env[INSTANCE_VARIABLE] = instance_id
        if names:
            env["LISTEN_FDS"] = str(len(names))
            env["LISTEN_FDNAMES"] = ":".join(names)
        return env

    async def _run(self, child: Child, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Owns the process until it exits: reads its notifications, reaps it, cleans up."""
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_read_notifications, child)
                output_done = anyio.Event()
                tasks.start_soon(_log_output, child, output_done)
                task_status.started()
                await child.process.wait()
                with anyio.move_on_after(_OUTPUT_DRAIN):  # its last lines, e.g. "drained; exiting"
                    await output_done.wait()
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if child.process.returncode is None:  # cancelled while it runs: never leave it behind
                    _kill_group(child)
                    with anyio.move_on_after(_KILL_WAIT):
                        await child.process.wait()
                if child.process.stdout is not None:
                    await child.process.stdout.aclose()
            child.returncode = child.process.returncode
            _receive_notifications(child)  # a last STATUS= sent right before exiting
            child.notify.close()
            if child.health is not None:
                child.health.close()
            if child.handoff is not None:
                child.handoff.close()
            await self._end_leftovers(child)
            caught = room.release_cgroup(child.cgroup)  # what it started, however detached
            if caught:
                log.warning("killed %s left in the cgroup of %s (pid %d)", caught, child.version, child.pid)
            self._roster.children.discard(child)
            child.exited.set()
        self._on_exit(child)

    async def _end_leftovers(self, child: Child) -> None:
        """Wait for the processes ``child`` left behind: SIGTERM (nobody else will tell them), the
        rest of its drain time to exit on their own, then SIGKILL. Logged once: routine when they
        exit by themselves (a multiprocessing resource tracker does), a warning when killed."""
        entry = f"{INSTANCE_VARIABLE}={child.instance_id}"
        if not procs.processes_with(entry):
            return
        ended_at = time.monotonic()
        deadline = child.drain_deadline if child.drain_deadline is not None else ended_at + self._config.drain_timeout
        grace = max(0.0, deadline - ended_at)
        sweep = await anyio.to_thread.run_sync(
            functools.partial(procs.end_processes_with, entry, grace=grace, timeout=_KILL_WAIT)
        )
        seconds = time.monotonic() - ended_at
        left = list(sweep.signalled)
        if not left and not sweep.survivors:
            return  # gone between the two looks
        if sweep.survivors:
            log.error("%s (pid %d) left %s; %s survived SIGKILL", child.version, child.pid, left, list(sweep.survivors))
        elif sweep.killed:
            log.warning("%s (pid %d) left %s; killed %s, still running %.1f s after it",
                        child.version, child.pid, left, list(sweep.killed), seconds)  # fmt: skip
        else:
            log.debug("%s (pid %d) left %s; they exited within %.2f s", child.version, child.pid, left, seconds)

    async def stop(self, child: Child) -> tuple[float, bool]:
        """SIGTERM, wait up to drain_timeout, then SIGKILL the process group.

        Returns (seconds until it exited, whether it had to be killed). Not cancellable: a
        half-stopped instance is worse than a late one.
        """
        child.supervised = False
        child.stopping = True
        began = time.monotonic()
        if child.drain_deadline is None:
            child.drain_deadline = began + self._config.drain_timeout
        killed = False
        with anyio.CancelScope(shield=True):
            if not child.exited.is_set():
                try:
                    child.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                with anyio.move_on_after(max(0.0, child.drain_deadline - began)):
                    await child.exited.wait()
            if not child.exited.is_set():
                if child.process.returncode is None:
                    killed = True
                    _kill_group(child)
                # else only processes it left behind remain: _end_leftovers kills them now
                with anyio.move_on_after(2 * _KILL_WAIT):
                    await child.exited.wait()
                if not child.exited.is_set():
                    log.error("%s (pid %d) survived SIGKILL for %g s", child.version, child.pid, _KILL_WAIT)
        return time.monotonic() - began, killed


async def _read_notifications(child: Child) -> None:
    while True:
        await anyio.wait_readable(child.notify)
        _receive_notifications(child)


def _receive_notifications(child: Child) -> None:
    """Handle every sd_notify datagram waiting on the instance's notify socket."""
    while True:
        try:
            datagram = child.notify.recv(4096)
        except OSError:  # nothing waiting (EAGAIN), or already closed
            return
        for line in datagram.decode(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key == "READY" and value == "1":
                child.ready.set()
            elif key == "STATUS":
                child.status = value
                log.info("%s (pid %d): %s", child.version, child.pid, value)
            elif key == "STOPPING" and value == "1":
                log.info("%s (pid %d) is stopping", child.version, child.pid)


async def _log_output(child: Child, done: anyio.Event) -> None:
    """The app's stdout and stderr (one pipe) as log lines, with its version and pid as fields."""
    fields = {"app_version": child.version, "app_pid": child.pid}

    def emit(line: str) -> None:
        child.output.append(line)
        _app_output.info("%s", line, extra=fields)

    try:
        if child.process.stdout is not None:
            await logring.pump_lines(child.process.stdout, emit)
    finally:
        done.set()


def _substitute(text: str, root: Path, app_dir: Path) -> str:
    # str.replace, not str.format: commands may hold other braces (shell, awk, JSON)
    return text.replace("{app_dir}", str(app_dir)).replace("{root}", str(root))


def _kill_group(child: Child) -> None:
    """SIGKILL the instance's process group (it leads its own session) while its pid is ours."""
    if child.process.returncode is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
