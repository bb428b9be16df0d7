"""``sshfwup`` command line: serve, upload, sim, firmware, keys."""

from __future__ import annotations

import argparse
from pathlib import Path
import logging
import sys
from typing import Any
from collections.abc import Sequence

from . import __version__
from .connection_options import add_connection_arguments

__all__ = ["EXIT_CANNOT_LISTEN", "main", "operator_errors"]

#: ``sshfwup serve``'s exit status when a port it must listen on is taken or not allowed: a
#: service manager should not restart it in a loop (systemd: ``RestartPreventExitStatus=3``; the
#: simulated machine powers off). 1 is any other operator error, 2 a bad configuration.
EXIT_CANNOT_LISTEN = 3

DESCRIPTION = """\
Zero-downtime A/B firmware updates over SSH for embedded Linux devices.

On the device:        sshfwup serve --config /etc/sshfwup.toml
From a build machine: sshfwup upload [USER@]HOST FILE.fw       (or: cat FILE.fw | ssh -s HOST fwup)
                      ssh HOST status | logs [-n N] [-f] | reboot | revert | validate
Build side:           sshfwup firmware manifest|mark|info|diff|sign …,  sshfwup keys gen …
Try it without a board: sshfwup sim create DIR; sshfwup sim run DIR   (root; see `sshfwup sim --help`)
"""

UPLOAD_DESCRIPTION = """\
Stream FILE.fw to a device's `fwup` SSH subsystem — exactly what `cat FILE.fw | ssh -s HOST fwup`
and Nerves' upload.sh send, so it works with any ssh_subsystem_fwup-compatible device — and
follow the update: a bar for the transfer (bytes, rate, time left), one for fwup, the device's
stage lines and its verdict. Without a terminal (CI logs, pipes) the same as plain lines.

With --wait (the default on a terminal), after a hot swap it shows the app's new version and the
pending reboot; after a reboot verdict it reconnects until the device is back (bounded by
--timeout) and tells whether the new firmware booted and was validated, or the device fell back.
"""

UPLOAD_EPILOG = """\
exit status:
  0    the update was applied (with --wait after a reboot: the new firmware runs and is validated)
  1    refused or failed: nothing changed, or it was rolled back (the message says which);
       with --wait: the device fell back, or the new firmware was not validated in time
  2    bad arguments: no such file, a directory, an unreadable key
  130  interrupted (Ctrl-C): one line says what the device did, asked once (up to 5 s) with
       `status --json`; a second Ctrl-C stops waiting for that answer
  255  the connection failed or was lost (as ssh); with --wait: the device did not come back

examples:
  sshfwup upload root@device app.fw
  sshfwup upload -p 2222 -i keys/dev/id_ed25519 root@127.0.0.1 app.fw --wait --timeout 120
"""

SERVE_DESCRIPTION = """\
Run the device side: recover from whatever a crash or power cut left, start the application,
listen for SSH uploads and device commands, tell systemd READY=1 (Type=notify), and validate a
first boot of new firmware once the app has stayed healthy. deploy/sshfwup.toml documents every
option; docs/deploying.md shows configurations for common board layouts.
"""

SERVE_EPILOG = """\
exit status:
  0    stopped by SIGTERM/SIGINT
  1    cannot run as configured or set up (the message says what to fix)
  2    the configuration file is invalid
  3    a port it must listen on ([server] port, [app] sockets) is taken or not allowed; the
       message names who holds it (don't restart in a loop: RestartPreventExitStatus=3)
"""


def _serve(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"sshfwup serve: {e}", file=sys.stderr)
        return 2
    if args.front is not None:
        return _serve_front(args, config)
    if config.server.event_loop == "asyncio":  # (uvloop imports ssl itself)
        from sshfwup.system import no_tls

        no_tls.install()  # the supervisor speaks no TLS: OpenSSL stays out of it (~4.5 MiB)
    import anyio

    from .daemon import run_daemon
    from sshfwup.supervisor.logring import RingFormatter

    for handler in logging.getLogger().handlers:  # the app's output lines show its version too
        handler.setFormatter(RingFormatter())
    try:
        anyio.run(run_daemon, config, backend_options={"use_uvloop": _use_uvloop(config.server.event_loop)})
    except KeyboardInterrupt:
        pass
    except BaseException as e:  # noqa: B036 - groups from the task groups, sorted below
        problems = operator_errors(e)
        if problems is None:
            raise
        for problem in problems:
            print(f"sshfwup serve: {problem}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN if _cannot_listen(e) else 1
    return 0


def _serve_front(args: argparse.Namespace, config: Any) -> int:
    """The SSH front, started by the supervisor (``sshfwup/ssh/front.py``). Its lines go to the
    supervisor on stderr as ``LEVEL logger: text``; the supervisor stamps and keeps them."""
    import anyio

    from sshfwup.ssh.front import parse_fds, run_front

    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    listen, control = parse_fds(args.front)
    return anyio.run(run_front, config, listen, control,
                     backend_options={"use_uvloop": _use_uvloop(config.server.event_loop)})  # fmt: skip


def _cannot_listen(error: BaseException) -> bool:
    """Did serve stop because a port it must listen on is taken (or not allowed)?"""
    from sshfwup.system.ports import ListenError

    if isinstance(error, BaseExceptionGroup):
        return any(_cannot_listen(e) for e in error.exceptions)
    return isinstance(error, ListenError)


def _use_uvloop(event_loop: str) -> bool:
    """uvloop when configured and importable; else asyncio with a warning: SSH must come up even
    when an optional speed-up is missing or broken on the device."""
    if event_loop != "uvloop":
        return False
    try:
        import uvloop  # noqa: F401 - only to know it loads; anyio makes the loop
    except ImportError as e:
        logging.getLogger(__name__).warning(
            "[server] event_loop = \"uvloop\" but uvloop cannot be imported (%s; pip install 'sshfwup[uvloop]'); "
            "serving with asyncio's event loop", e,
        )  # fmt: skip
        return False
    logging.getLogger(__name__).info("event loop: uvloop")
    return True


def operator_errors(error: BaseException) -> list[str] | None:
    """The messages of an error (or exception group) made only of problems an operator can fix
    from the message alone — a wrong setting, a port in use — or None for anything else (a bug,
    whose traceback is worth having)."""
    from sshfwup.boot.bootenv import BootEnvError
    from .daemon import DaemonError
    from sshfwup.boot.slots import SlotError
    from sshfwup.system.ports import ListenError
    from sshfwup.supervisor.supervisor import SupervisorError

    expected = (DaemonError, SupervisorError, BootEnvError, SlotError, ListenError, OSError)
    leaves: list[BaseException] = []
    stack = [error]
    while stack:
        item = stack.pop()
        if isinstance(item, BaseExceptionGroup):
            stack.extend(item.exceptions)
        else:
            leaves.append(item)
    if not leaves or not all(isinstance(leaf, expected) for leaf in leaves):
        return None
    return [str(leaf) for leaf in leaves]


def _upload(args: argparse.Namespace) -> int:
    from sshfwup.host.client import upload_main

    return upload_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sshfwup", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sshfwup {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="what `serve` logs to stderr and to `ssh HOST logs` (default: info)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve", help="run the device-side server (SSH listener + app supervisor)",
        description=SERVE_DESCRIPTION, epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--config", required=True, metavar="FILE", help="TOML configuration (see deploy/sshfwup.toml)")
    # The supervisor starts its SSH front as `sshfwup serve --front LISTEN_FDS:CONTROL_FD`.
    p.add_argument("--front", metavar="FDS", help=argparse.SUPPRESS)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "upload", help="upload a .fw file to a device and follow the update",
        description=UPLOAD_DESCRIPTION, epilog=UPLOAD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_upload_arguments(p)
    p.set_defaults(func=_upload)

    sub.add_parser("sim", help="the simulated A/B device (see `sshfwup sim --help`)", add_help=False)
    sub.add_parser("vm", help="the QEMU device: a real boot, no hardware (see `sshfwup vm --help`)", add_help=False)
    sub.add_parser("firmware", help="build-side tools: manifest, mark, build, delta, info, diff, sign (see `sshfwup firmware --help`)",
                   add_help=False)  # fmt: skip
    sub.add_parser("keys", help="generate firmware signing and SSH keys (see `sshfwup keys --help`)", add_help=False)
    return parser


def add_upload_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", metavar="[USER@]HOST", help="the device (user: any name the device accepts, e.g. root)")
    p.add_argument("file", metavar="FILE.fw", help="the firmware file")
    add_connection_arguments(p)
    p.add_argument(
        "--wait", action=argparse.BooleanOptionalAction, default=None,
        help="after the verdict, follow the device: the app's new version after a hot swap; after a reboot, "
        "reconnect and report what booted, validated or fell back (default: on when stderr is a terminal)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS",
        help="how long --wait waits for the device to come back and validate (default: 300)",
    )  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or percentages: stage lines and verdict only")
    p.add_argument(
        "--delta-from", metavar="DIR", type=Path,
        help="send a delta patch: ask the device which firmware it runs, find that .fw in DIR and send the patch "
        "from it to FILE.fw (made once, then cached); the full file when DIR has no match",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from .dependency_warnings import silence

    silence()  # before anything imports asyncssh: dependencies' warnings are not the operator's
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommand families with their own parsers.
    if argv[:1] == ["sim"]:
        from .sim.cli import main as sim_main

        return sim_main(argv[1:])
    if argv[:1] == ["vm"]:
        from .vm.cli import main as vm_main

        return vm_main(argv[1:])
    if argv[:1] in (["firmware"], ["keys"]):
        from sshfwup.host.firmware import main as firmware_main

        return firmware_main(argv)

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    from sshfwup.ssh.logsafe import install

    install()  # clients choose names and versions that end up in log lines
    return int(args.func(args) or 0)
