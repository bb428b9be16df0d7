"""``sshfwup sim``: make, run and drive simulated devices from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio

from sshfwup import __version__
from sshfwup.boot.backends import CONTRACTS, DEFAULT_CONTRACT
from sshfwup.firmware.errors import FirmwareError
from sshfwup.firmware.manifest import ManifestError
from sshfwup.sim.bootloader import BootEnvError
from sshfwup.sim.device import SimDevice, SimError, cleanup
from sshfwup.sim.layouts import ExampleLayout, find_layout
from sshfwup.sim.machine import (
    MachineError,
    MachineState,
    power_cut_machine,
    reboot_machine,
    run_machine,
)
from sshfwup.sim.rootfs import CHANGES

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

DESCRIPTION = """\
Simulated A/B devices for sshfwup: a disk image with a U-Boot environment, two root
filesystem slots and a data partition, mounted through loop devices (needs root).

  sshfwup sim create DIR                 make a device (factory-flashed with a sample v1)
  sshfwup sim create DIR --layout NAME   ... with a layout of deploy/examples: bootcount,
                                         nerves-bbb-like, tryboot-like (Pi-like, fwup-ops)
  sshfwup sim firmware OUT.fw --version V   build a sample firmware to upload (--change: reboot)
  sshfwup sim run DIR                    power it on in the foreground (Ctrl-C powers off)
  sshfwup sim reboot DIR                 reboot the running machine
  sshfwup sim power-cut DIR              cut its power (it boots again at once)
  sshfwup sim status DIR                 machine state and boot environment
  sshfwup sim destroy DIR                stop everything and delete the directory
  sshfwup sim cleanup                    remove what killed runs left (devices whose owner died)

By default the device's SSH server listens on 127.0.0.1:2222 and its sample app on
127.0.0.1:8080. Hands-on, with your own key (as root):

  sshfwup sim create /tmp/dev --authorized-key ~/.ssh/id_ed25519.pub --fwup "$(command -v fwup)"
  sshfwup sim run /tmp/dev &
  ssh -p 2222 root@127.0.0.1 status
  ssh -p 2222 root@127.0.0.1 logs -f          (another terminal; Ctrl-C leaves)
  sshfwup sim firmware /tmp/v2.fw --version 2.0.0
  sshfwup upload -p 2222 root@127.0.0.1 /tmp/v2.fw --wait
"""


def build_parser(prog: str = "sshfwup sim") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"sshfwup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    create = sub.add_parser("create", help="make a new simulated device in DIR")
    create.add_argument("dir", type=Path, metavar="DIR", help="the device directory (created)")
    create.add_argument("--firmware", type=Path, metavar="FILE", help="the .fw to flash (default: build a sample 1.0.0)")
    create.add_argument("--ssh-port", type=int, default=2222, help="sshfwup's SSH port (default: %(default)s)")
    create.add_argument("--app-port", type=int, default=8080, help="the sample app's HTTP port (default: %(default)s)")
    create.add_argument(
        "--authorized-key", type=Path, action="append", default=[], metavar="FILE",
        help="a public key file allowed to upload (repeatable)",
    )
    create.add_argument("--fwup", metavar="PATH", help="the fwup executable (default: fwup on PATH)")
    create.add_argument(
        "--contract", choices=CONTRACTS, default=None,
        help="the boot contract its bootloader speaks and its server's [boot] contract: uboot-bootcount "
        "(upgrade_available/bootcount/bootlimit fallback), uboot-nerves (a Nerves system's script: "
        "one trial boot via nerves_fw_booted; factory env nerves_fw_autovalidate=0) or fwup-ops (a "
        "Raspberry-Pi-like firmware: autoboot.txt and a one-shot tryboot, changed by the system's ops "
        "archive; layout tryboot-like unless --layout says) (default: the layout's, else "
        f"{DEFAULT_CONTRACT})",
    )
    _layout_options(create, ops=True)

    fw = sub.add_parser(
        "firmware", help="build a sample firmware (.fw) to upload to a simulated device",
        description="Build the sample app's firmware for a simulated device: app-only changes (hot "
        "reload) by default; --change makes the device decide a reboot.",
    )  # fmt: skip
    fw.add_argument("output", type=Path, metavar="OUT.fw", help="the firmware file to write")
    fw.add_argument("--version", dest="fw_version", required=True, metavar="VERSION", help="its version, e.g. 2.0.0")
    _layout_options(fw, ops=False)
    fw.add_argument(
        "--change", action="append", default=[], choices=sorted(CHANGES), metavar="WHAT",
        help=f"also change this outside the app, so that the device reboots; repeatable ({', '.join(sorted(CHANGES))})",
    )  # fmt: skip

    run = sub.add_parser("run", help="power the device on; runs in the foreground until SIGTERM/Ctrl-C")
    run.add_argument("dir", type=Path, metavar="DIR", help="the device directory")
    run.add_argument(
        "--server-command", metavar="JSON",
        help='run this instead of sshfwup serve: a JSON list; "{config}" and "{device}" are substituted',
    )
    run.add_argument(
        "--owner-fd", type=int, metavar="FD",
        help="power off when this pipe's write end closes (its owner died); SimMachine passes it",
    )  # fmt: skip

    for name, text in (
        ("reboot", "reboot the running machine (the device's reboot command)"),
        ("power-cut", "cut the running machine's power; it boots again at once"),
        ("status", "print the machine state and the boot environment as JSON"),
        ("destroy", "kill the machine and its processes, unmount, detach, delete DIR"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("dir", type=Path, metavar="DIR", help="the device directory")
    clean = sub.add_parser(
        "cleanup", help="remove the simulated devices whose owner died (killed tests, demos, sim run)",
        description="Find simulated devices left by runs that were killed — their owner (the test "
        "run, demo or `sim run` that set them up) is gone — and remove their processes, mounts and "
        "loop devices, one line per thing removed. Devices of live runs are never touched; devices "
        "without an owner record (an older sshfwup's) are listed and left alone: `sim destroy DIR`.",
    )  # fmt: skip
    clean.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    return parser


def _layout_options(parser: argparse.ArgumentParser, *, ops: bool) -> None:
    parser.add_argument(
        "--layout", metavar="NAME|DIR",
        help="a disk layout: a directory with fwup.conf (and ops.conf, sshfwup.toml), or the name of one "
        "in deploy/examples (bootcount, nerves-bbb-like, tryboot-like)",
    )  # fmt: skip
    parser.add_argument("--fwup-conf", type=Path, metavar="FILE", help="build the firmware with this fwup.conf "
                        "(default: the layout's, else the simulator's)")  # fmt: skip
    if ops:
        parser.add_argument("--ops-conf", type=Path, metavar="FILE", help="the system's ops archive, as a fwup "
                            "conf to build (fwup-ops; default: the layout's ops.conf)")  # fmt: skip


def _example(args: argparse.Namespace) -> ExampleLayout:
    """The layout the options name (fwup-ops alone means tryboot-like); --fwup-conf/--ops-conf win."""
    contract = getattr(args, "contract", None)
    if args.layout is not None:
        example = find_layout(args.layout)
    elif contract == "fwup-ops" and args.fwup_conf is None:
        example = find_layout("tryboot-like")
    else:
        example = ExampleLayout("", None)
    if args.fwup_conf is not None:
        example = dataclasses.replace(example, fwup_conf=args.fwup_conf.resolve())
    if getattr(args, "ops_conf", None) is not None:
        example = dataclasses.replace(example, ops_conf=args.ops_conf.resolve())
    layout_contract = example.boot.get("contract")
    if contract is not None and layout_contract is not None and contract != layout_contract:
        raise SimError(f"--contract {contract}, but layout {example.name}'s sshfwup.toml says contract = "
                       f"{layout_contract!r}")  # fmt: skip
    return example


def _overrides(example: ExampleLayout, contract: str | None) -> dict[str, Any] | None:
    boot = {**example.boot, "contract": contract or example.boot.get("contract", DEFAULT_CONTRACT)}
    # The default contract writes nothing, so a default device's files stay as they were.
    return {"boot": boot} if boot != {"contract": DEFAULT_CONTRACT} else None


def _create(args: argparse.Namespace) -> int:
    keys: list[str] = []
    for key_file in args.authorized_key:
        try:
            keys += [line for line in key_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise SimError(f"cannot read public key file {key_file}: {e.strerror}") from None
    for port in (args.ssh_port, args.app_port):
        if not 0 < port < 65536:
            raise SimError(f"port must be 1..65535, got {port}")
    example = _example(args)
    overrides = _overrides(example, args.contract)
    made = {"fwup": args.fwup, "authorized_keys": keys, "ssh_port": args.ssh_port, "app_port": args.app_port,
            "config_overrides": overrides, "ops_conf": example.ops_conf}  # fmt: skip
    if args.firmware is not None:
        device = SimDevice.create(args.dir, firmware=args.firmware, **made)
    else:
        from sshfwup.sim.rootfs import build_sample_firmware

        with tempfile.TemporaryDirectory(prefix="sshfwup-sim-fw-") as work:
            firmware = build_sample_firmware(Path(work), version="1.0.0", conf=example.fwup_conf)
            device = SimDevice.create(args.dir, firmware=firmware, **made)
    print(f"created {device.path} (SSH on 127.0.0.1:{device.ssh_port}, the sample app on 127.0.0.1:{device.app_port})")
    if not keys:
        print(f"note: no key may log in yet: pass --authorized-key FILE.pub, or add public keys to "
              f"{device.server_data_dir}/authorized_keys while it runs")  # fmt: skip
    print(next_steps(device.path, device.ssh_port, device.app_port))
    return 0


def next_steps(path: Path, ssh_port: int, app_port: int) -> str:
    """What to type after ``create`` (the same words as the README's hands-on section)."""
    ssh = f"ssh -p {ssh_port} root@127.0.0.1"
    return (
        f"power it on:     sshfwup sim run {path}   (foreground; Ctrl-C powers it off)\n"
        f"then:            {ssh} status\n"
        f"                 {ssh} logs -f\n"
        f"                 sshfwup upload -p {ssh_port} root@127.0.0.1 FILE.fw --wait\n"
        f"                 curl http://127.0.0.1:{app_port}/"
    )


def _firmware(args: argparse.Namespace) -> int:
    from sshfwup.sim.rootfs import build_sample_firmware

    out = args.output.resolve()
    if out.suffix != ".fw":
        raise SimError(f"{args.output}: the firmware file name must end in .fw")
    with tempfile.TemporaryDirectory(prefix="sshfwup-sim-fw-") as work:
        built = build_sample_firmware(Path(work), version=args.fw_version, name="firmware", changes=tuple(args.change),
                                      conf=_example(args).fwup_conf)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(built, out)
    kind = f"reboot ({', '.join(args.change)} changed)" if args.change else "hot reload (app only)"
    print(f"built {out}: version {args.fw_version}, {kind}")
    return 0


def _run(args: argparse.Namespace) -> int:
    command = None
    if args.server_command:
        try:
            command = json.loads(args.server_command)
        except ValueError as e:
            raise SimError(f"--server-command is not JSON: {e}") from None
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise SimError("--server-command must be a non-empty JSON list of strings")
    return anyio.run(lambda: run_machine(args.dir, server_command=command, owner_fd=args.owner_fd))


def _status(args: argparse.Namespace) -> int:
    device = SimDevice.open(args.dir)
    state = MachineState.read(device.path)
    try:
        env: dict[str, str] | str = device.env()
    except BootEnvError as e:
        env = f"unreadable: {e}"
    report = {"device": str(device.path), "machine": asdict(state) if state else None, "boot_env": env}
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def _destroy(args: argparse.Namespace) -> int:
    path = args.dir.resolve()
    if not path.exists():
        raise SimError(f"{path} does not exist")
    if not (path / "device.json").exists() and not (path / "disk.img").exists():
        raise SimError(f"{path} is not a simulated device; refusing to delete it")
    cleanup(path)
    shutil.rmtree(path)
    print(f"destroyed {path}")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    from sshfwup.sim.stale import remove_stale

    if not args.verbose:  # the lines below say it once; the library's log would repeat each
        logging.getLogger("sshfwup.sim.stale").setLevel(logging.WARNING)
    report = remove_stale(dry_run=args.dry_run)
    for line in report.removed:
        print(line)
    for line in report.unowned:
        print(f"left alone: {line}")
    for line in report.problems:
        print(f"sshfwup sim cleanup: {line}", file=sys.stderr)
    if not report.removed:
        print("no stale simulated devices")
    return 1 if report.problems else 0


def main(argv: Sequence[str] | None = None, *, prog: str = "sshfwup sim") -> int:
    from sshfwup.dependency_warnings import silence

    silence()  # `python -m sshfwup.sim` (the sim's reboot command) starts here, not in sshfwup.cli
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s sim[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    if args.command in ("create", "run", "destroy", "cleanup") and os.geteuid() != 0:
        print(f"{prog} {args.command}: needs root (loop devices and mounts)", file=sys.stderr)
        return 1
    handlers = {
        "create": _create,
        "firmware": _firmware,
        "run": _run,
        "reboot": lambda a: reboot_machine(a.dir) or 0,
        "power-cut": lambda a: power_cut_machine(a.dir) or 0,
        "status": _status,
        "destroy": _destroy,
        "cleanup": _cleanup,
    }
    try:
        return handlers[args.command](args)
    except (SimError, MachineError, BootEnvError, FirmwareError, ManifestError, ValueError, PermissionError) as e:
        print(f"{prog} {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
