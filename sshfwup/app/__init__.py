"""Helpers for an application run by ``sshfwup serve`` (stdlib only: vendor the ``sshfwup/app/`` folder freely).

The supervisor owns the application's listening sockets for the device's lifetime and hands them
to every instance of the app exactly the way systemd socket activation does:

- the sockets are file descriptors 3, 4, ... in the order of ``[app] sockets``;
- ``LISTEN_FDS`` is their count, ``LISTEN_PID`` the pid of the process they are meant for (the
  app's own pid), ``LISTEN_FDNAMES`` their colon-separated names;
- with ``ready = "http"`` or ``"tcp"`` one extra socket comes last, named ``health``: the
  supervisor sends ``tcp`` probes there, and ``http`` probes where a TCP socket is shared between
  versions, because a probe through a shared socket could be answered by the *old* version during
  a swap. Where each version has a TCP socket of its own (the reuseport socket paths, see
  :mod:`sshfwup.supervisor.listeners`), ``http`` probes reach the instance through the public address
  instead. **Serve every socket you are given** (gunicorn and :func:`listen_sockets` +
  :func:`serve` do);
- ``NOTIFY_SOCKET`` takes sd_notify datagrams: ``READY=1`` when the app serves
  (``ready = "notify"``), ``STATUS=...`` for the operator, ``STOPPING=1`` when it drains.

The listening sockets are non-blocking, and may be shared with another instance during a swap
(UNIX sockets always are), so an accept may find nothing (``EAGAIN``) — wait for readability and
try again. Before an app gets SIGTERM, new connections already go to the new version (on the
reuseport paths). On SIGTERM an app stops accepting by *closing* its copies of the listeners
(never ``shutdown()``: that acts on the supervisor's socket too), finishes the requests in
flight, and exits.

gunicorn (>= 20.0 adopts ``LISTEN_FDS`` by itself and sends ``READY=1``; ``--preload`` makes that
come after the app imported, so a broken release is not ready; SIGTERM drains)::

    command = ["/usr/bin/python3", "-m", "gunicorn", "--preload", "--no-control-socket", "app:application"]
    # ready = "notify"

uvicorn (serves a single fd and sends no notification: ``ready = "http"`` needs no code where the
socket is the instance's own; with ``ready = "notify"`` call :func:`notify_ready` from the
lifespan startup handler)::

    command = ["/usr/bin/python3", "-m", "uvicorn", "--fd", "3", "app:app"]   # ready = "http"

A bare command name is looked up on the server's ``PATH``, not the app's directory: give an
absolute path (or ``-m`` with the package on ``PYTHONPATH``, or ``PATH`` in ``[app] env``).
docs/hot-reload-apps.md has hypercorn and the details.

plain asyncio::

    import asyncio, signal
    from sshfwup import app          # or the vendored copy of this package

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ...

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        sockets = app.listen_sockets()
        app.notify_ready()           # the sockets already listen: nothing is refused meanwhile
        await app.serve(sockets.values(), handle, stop=stop)   # returns once drained
        app.notify_stopping()

    asyncio.run(main())

With ``[app] handoff = true`` the old version can hand its in-memory state and established
connections to the new one during a swap: ``sshfwup.app.handoff`` (:mod:`sshfwup.app.handoff`, one
more stdlib-only file to vendor) has ``receive()`` for the new version and ``asked()``/``send()``
for the old one; docs/hot-reload-apps.md spells out the protocol.

Run as a script (``python -I -S app.py --sshfwup-exec ...``) this file is also the supervisor's
exec shim: it moves the passed sockets to fds 3.., sets ``LISTEN_PID`` to its own pid, puts the
process in the app's room (:mod:`sshfwup.supervisor.room`: cgroup, user, capabilities, no_new_privs), ties
its lifetime to the supervisor's (``PR_SET_PDEATHSIG``) and execs the application — so the pid
the app runs under is the one named in ``LISTEN_PID``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # asyncio costs ~35 ms to import; the exec shim and sync apps need none of it
    import asyncio
    from collections.abc import Awaitable, Callable, Iterable
    from typing import Any

__all__ = [
    "LISTEN_FDS_START",
    "handoff",
    "listen_sockets",
    "notify",
    "notify_ready",
    "notify_status",
    "notify_stopping",
    "serve",
]

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


# --- sockets -------------------------------------------------------------------------------


def listen_sockets(*, unset_environment: bool = True) -> dict[str, socket.socket]:
    """The listening sockets passed to this process, by name, in fd order.

    Empty unless ``LISTEN_PID`` is this process (the variables were meant for another one).
    Family and type are read from each fd. A missing name becomes ``fd<N>``; a repeated name gets
    ``.<N>`` appended. The fds are made close-on-exec, and by default the ``LISTEN_*`` variables
    are removed afterwards (like ``sd_listen_fds(1)``) so that child processes do not mistake the
    sockets for theirs.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        pid, count = 0, 0
    names_text = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for variable in _LISTEN_VARIABLES:
            os.environ.pop(variable, None)
    if pid != os.getpid() or count <= 0:
        return {}
    names = names_text.split(":") if names_text else []
    sockets: dict[str, socket.socket] = {}
    for index in range(count):
        fd = LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else f"fd{fd}"
        if name in sockets:
            name = f"{name}.{fd}"
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family, type and protocol are read from the fd
        # Mirror the fd's real O_NONBLOCK state in the Python object; changing it would change it
        # for every process sharing this listener.
        sock.setblocking(os.get_blocking(fd))
        sockets[name] = sock
    return sockets


async def serve(
    sockets: Iterable[socket.socket],
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    stop: asyncio.Event,
    drain_timeout: float | None = None,
) -> None:
    """Accept connections on ``sockets`` and run ``handle`` for each until ``stop`` is set;
    then close this process's copies of the listeners and return once every handler finished —
    or, with ``drain_timeout``, once that many seconds have passed: the handlers still running
    are cancelled (a client that never finishes must not hold the old version forever; set it
    below ``[app] drain_timeout``, after which the supervisor kills the process).

    Unlike ``asyncio.start_server`` followed by ``Server.close()``, no connection is ever accepted
    and then dropped: each accept and the creation of its handler task happen in one callback, so
    stopping can never fall between them. The writer is closed after ``handle`` returns. Handlers
    see ``stop`` too: answer the request in progress with ``Connection: close`` and end.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    listeners = list(sockets)
    handlers: set[asyncio.Task[None]] = set()

    async def run_handler(conn: socket.socket) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
            await handle(reader, writer)
        except Exception:
            log.exception("connection handler failed")
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()

    def accept_all(listener: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # queue empty, or another instance took the connection
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE and friends: leave the rest queued for later
                log.warning("accept failed: %s", e)
                return
            conn.setblocking(False)
            task = loop.create_task(run_handler(conn))
            handlers.add(task)
            task.add_done_callback(handlers.discard)

    for listener in listeners:
        listener.setblocking(False)
        loop.add_reader(listener.fileno(), accept_all, listener)
    try:
        await stop.wait()
    finally:
        for listener in listeners:
            loop.remove_reader(listener.fileno())
            listener.close()  # our copy only: the supervisor's keeps the queue alive
    if handlers:
        _, late = await asyncio.wait(set(handlers), timeout=drain_timeout)
        if late:
            log.warning("%d connection(s) still busy after %s s of draining; closing them", len(late), drain_timeout)
            for task in late:
                task.cancel()
            await asyncio.wait(late)


def __getattr__(name: str) -> Any:
    """``sshfwup.app.handoff``: the state and connection hand-off (:mod:`sshfwup.app.handoff`),
    imported on first use — the exec shim and apps without hand-off never load it."""
    if name == "handoff":
        import importlib  # not `from . import handoff`: that asks this __getattr__ again

        return importlib.import_module(f"{__name__}.handoff")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- sd_notify -----------------------------------------------------------------------------


def notify(message: str) -> bool:
    """Send one sd_notify datagram (``"READY=1"``, ``"STATUS=..."``, ...) to ``NOTIFY_SOCKET``.

    Returns False when there is no notify socket or the message could not be sent.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # Linux abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify the supervisor at %s: %s", os.environ["NOTIFY_SOCKET"], e)
        return False
    return True


def notify_ready(status: str | None = None) -> bool:
    """Tell the supervisor this instance serves now (``READY=1``)."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={status}")


def notify_stopping() -> bool:
    """Tell the supervisor this instance is draining (``STOPPING=1``)."""
    return notify("STOPPING=1")


def notify_status(text: str) -> bool:
    """A one-line status for the operator (``STATUS=...``)."""
    return notify(f"STATUS={text}")


# --- the supervisor's exec shim --------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE = 47, 2
_CAPABILITY_VERSION_3 = 0x20080522
_USAGE = "usage: app.py --sshfwup-exec PARENT_PID FD,FD,... [--room JSON] -- COMMAND [ARG...]\n"


def _exec_app(args: list[str]) -> None:
    """``--sshfwup-exec PARENT_PID FD,FD,... [--room JSON] -- COMMAND ARGS...``: become the app.

    Runs in the freshly started child, before the application exists, so that the socket
    numbering, ``LISTEN_PID``, the room (:mod:`sshfwup.supervisor.room`: cgroup, groups, user,
    capabilities, no_new_privs) and the parent-death signal are set up by the process that then
    execs — the one whose pid the application will have.
    """
    if len(args) < 5 or args[0] != "--sshfwup-exec":
        sys.stderr.write(_USAGE)
        raise SystemExit(2)
    parent_pid = int(args[1])
    sources = [int(fd) for fd in args[2].split(",") if fd]
    rest = args[3:]
    room = None
    if rest[:1] == ["--room"] and len(rest) >= 2:
        import json

        room = json.loads(rest[1])
        rest = rest[2:]
    if rest[:1] != ["--"] or len(rest) < 2:
        sys.stderr.write(_USAGE)
        raise SystemExit(2)
    command = rest[1:]

    # Everything the shim needs is imported now: once it runs as the app's user, the
    # interpreter's own library directory may be out of reach.
    import ctypes
    import fcntl

    libc = ctypes.CDLL(None, use_errno=True)
    if room is not None:
        _enter_room(libc, room)
    # After the room: changing credentials clears the parent-death signal.
    _prctl(libc, "tie the app's life to the supervisor's", _PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(125)  # the supervisor died before we could tie our lifetime to it

    # Move every source above the target range first, so that no target overwrites a source.
    top = LISTEN_FDS_START + len(sources)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(top, max(sources, default=0) + 1)) for fd in sources]
    for fd in sources:
        os.close(fd)
    for index, fd in enumerate(moved):
        os.dup2(fd, LISTEN_FDS_START + index, inheritable=True)
        os.close(fd)

    os.environ["LISTEN_PID"] = str(os.getpid())
    # Python ignores SIGPIPE and SIGXFSZ at start-up; the application must not inherit that.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        _fail(f"cannot run {command[0]!r}: {e.strerror or e}", 127)


def _enter_room(libc: Any, room: dict[str, Any]) -> None:
    """cgroup → bounding set → groups, gid, uid → capabilities → no_new_privs, in that order:
    each step needs privileges the next one gives up."""
    cgroup = room.get("cgroup")
    if cgroup:
        try:
            os.mkdir(cgroup, 0o755)
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")  # "0": the writing process itself
        except OSError as e:
            _fail(f"cannot enter its cgroup {cgroup}: {e.strerror or e}", 126)
    keep = set(room.get("caps") or ())
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                last = int(f.read())
        except (OSError, ValueError):
            last = 40
        for cap in range(last + 1):
            if cap not in keep:
                _prctl(libc, f"drop capability {cap} from the bounding set", _PR_CAPBSET_DROP, cap)
    uid, gid = room.get("uid"), room.get("gid")
    if uid is not None and (os.geteuid() == 0 or uid != os.geteuid()):
        try:
            os.setgroups(list(room.get("groups") or ()))
            os.setresgid(gid, gid, gid)
            if keep:
                _prctl(libc, "keep capabilities across setuid", _PR_SET_KEEPCAPS, 1)
            os.setresuid(uid, uid, uid)
        except OSError as e:
            _fail(f"cannot switch to uid {uid} gid {gid}: {e.strerror or e}", 126)
        if keep:
            _set_capabilities(libc, keep)
    for cap in sorted(keep):
        _prctl(libc, f"raise ambient capability {cap}", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap)
    _prctl(libc, "set no_new_privs", _PR_SET_NO_NEW_PRIVS, 1)


def _set_capabilities(libc: Any, caps: set[int]) -> None:
    """Permitted, effective and inheritable = ``caps`` (ambient needs permitted + inheritable)."""
    import ctypes

    low = sum(1 << c for c in caps if c < 32)
    high = sum(1 << (c - 32) for c in caps if c >= 32)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(low, low, low, high, high, high)  # effective, permitted, inheritable
    if libc.capset(header, data) != 0:
        errno = ctypes.get_errno()
        _fail(f"cannot keep its capabilities: {os.strerror(errno)}", 126)


def _prctl(libc: Any, what: str, option: int, *values: int) -> None:
    import ctypes

    padded = [*values, 0, 0, 0, 0][:4]
    if libc.prctl(option, *padded) != 0:
        _fail(f"cannot {what}: {os.strerror(ctypes.get_errno())}", 126)


def _fail(message: str, status: int) -> None:
    notify(f"STATUS={message}")  # the supervisor quotes it in its failure reason
    sys.stderr.write(f"sshfwup: {message}\n")
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _exec_app(sys.argv[1:])
