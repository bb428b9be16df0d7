"""``sshfwup`` command line: serve, upload, sim, firmware, keys."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _serve(args: argparse.Namespace) -> int:
    import anyio

    from .config import ConfigError, load_config
    from .daemon import run_daemon

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"sshfwup: {e}", file=sys.stderr)
        return 2
    try:
        anyio.run(run_daemon, config)
    except KeyboardInterrupt:
        pass
    return 0


def _upload(args: argparse.Namespace) -> int:
    from .client import upload_main

    return upload_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommand families with their own parsers.
    if argv[:1] == ["sim"]:
        from .sim.cli import main as sim_main

        return sim_main(argv[1:])
    if argv[:1] in (["firmware"], ["keys"]):
        from .firmware import main as firmware_main

        return firmware_main(argv)

    parser = argparse.ArgumentParser(
        prog="sshfwup", description="Zero-downtime A/B firmware updates over SSH for embedded Linux devices."
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the device-side server (SSH listener + app supervisor)")
    p.add_argument("--config", required=True, help="TOML configuration (see deploy/sshfwup.toml)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("upload", help="upload a .fw file to a device and follow the update")
    p.add_argument("host", help="device address (HOST or USER@HOST)")
    p.add_argument("file", help="firmware file (.fw)")
    p.add_argument("-p", "--port", type=int, default=22)
    p.add_argument("-i", "--identity", action="append", default=[], help="private key file (repeatable)")
    p.add_argument("--known-hosts", default=None, help="known_hosts file (default: ~/.ssh/known_hosts)")
    p.add_argument(
        "--insecure-accept-host-key", action="store_true", help="do not check the device's host key (first contact)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar; stage lines and verdict only")
    p.set_defaults(func=_upload)

    sub.add_parser("sim", help="the simulated A/B device (see `sshfwup sim --help`)")
    sub.add_parser("firmware", help="build-side tools: manifest, mark, build, delta, info, diff, sign (see `sshfwup firmware --help`)")
    sub.add_parser("keys", help="generate firmware signing and SSH keys (see `sshfwup keys --help`)")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return int(args.func(args) or 0)
