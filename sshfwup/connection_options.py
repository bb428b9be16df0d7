"""How to reach a device from the command line: the same option names wherever sshfwup connects to
one (``sshfwup upload``, ``sshfwup firmware diff --running``).

Its own module so that :mod:`sshfwup.cli` and the host tools both import it without importing
each other; argparse only, so ``sshfwup serve`` pays nothing for it.
"""

from __future__ import annotations

import argparse

__all__ = ["add_connection_arguments"]


def add_connection_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How to reach a device: the same option names wherever sshfwup connects to one."""
    p.add_argument("-p", "--port", type=int, default=22, metavar="PORT", help="the device's SSH port (default: 22)")
    p.add_argument(
        "-i", "--identity", action="append", default=[], metavar="KEY",
        help="private key file to log in with; repeatable (default: ssh-agent and ~/.ssh/id_*)",
    )  # fmt: skip
    p.add_argument(
        "--known-hosts", default=None, metavar="FILE",
        help="known_hosts file with the device's host key (default: ~/.ssh/known_hosts)",
    )  # fmt: skip
    p.add_argument(
        "--insecure-accept-host-key", action="store_true",
        help="do not check the device's host key (first contact on a trusted network only)",
    )  # fmt: skip
