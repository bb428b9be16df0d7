"""``sshfwup vm``: build, run and destroy the QEMU device (a real boot: U-Boot, kernel, systemd)."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from sshfwup.vm.contracts import CONTRACTS, DEFAULT_CONTRACT
from sshfwup.vm.errors import VmError

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

DESCRIPTION = """\
The QEMU device: sshfwup on a real boot (U-Boot → Debian kernel → systemd → sshfwup.service),
no hardware. Needs root (mmdebstrap, chroot), QEMU and U-Boot: ./scripts/bootstrap.sh installs them.

  sshfwup vm build DIR            Debian bookworm + sshfwup's .deb, firmware 1.0.0, DIR/disk.img
                                  (written by fwup -t complete); the rootfs is cached in
                                  /var/cache/sshfwup-vm (SSHFWUP_VM_CACHE)
      --contract C                the boot contract ([boot] contract; DIR/vm.json records it), with
                                  U-Boot running the script shipped for it (deploy/uboot/*/boot.cmd):
                                  uboot-bootcount (default: up to 3 trial boots), uboot-nerves (a
                                  Nerves system's script: one trial boot) or fwup-ops (the same
                                  script; every boot-state change is a task of the device's ops
                                  archive, deploy/vm/ops.conf → /usr/share/fwup/ops.fw). The Pi's
                                  tryboot needs the Pi's firmware: the simulator proves that
                                  (sshfwup sim create --layout tryboot-like); the VM proves
                                  fwup-ops over U-Boot, as Nerves' U-Boot boards use it
  sshfwup vm firmware DIR -V 1.1  a new .fw from DIR/staging (edit it first), in DIR/fw/, for
                                  DIR's boot contract
  sshfwup vm run DIR              boot it (a fresh overlay per run); Ctrl-C powers it off
  sshfwup vm destroy DIR          stop what a run left and remove DIR
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sshfwup vm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build the image into DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--rebuild-rootfs", action="store_true", help="ignore the cached root filesystem")
    p.add_argument("--contract", choices=list(CONTRACTS), default=DEFAULT_CONTRACT,
                   help=f"the boot contract the device speaks (default {DEFAULT_CONTRACT})")  # fmt: skip
    p = sub.add_parser("firmware", help="build a firmware from DIR/staging")
    p.add_argument("dir", type=Path)
    p.add_argument("-V", "--version", required=True)
    p.add_argument("-o", "--output", type=Path, help="default: DIR/fw/VERSION.fw")
    p = sub.add_parser("run", help="boot DIR's disk under QEMU until Ctrl-C or power-off")
    p.add_argument("dir", type=Path)
    p.add_argument("--ssh-port", type=int, default=0, help="host port for SSH (127.0.0.1; default: a free one)")
    p.add_argument("--app-port", type=int, default=0, help="host port for the app (127.0.0.1; default: a free one)")
    p.add_argument("--console", action="store_true", help="show the serial console live")
    p.add_argument("--boot-timeout", type=float, default=240.0, metavar="SECONDS")
    p = sub.add_parser("destroy", help="stop a leftover QEMU of DIR and remove DIR")
    p.add_argument("dir", type=Path)
    return parser


async def _run(args: argparse.Namespace) -> int:
    from sshfwup.vm.image import VmDir
    from sshfwup.vm.leftovers import clear_run_dir
    from sshfwup.vm.machine import VmOptions, follow, run_vm

    vm = VmDir(args.dir.resolve())
    opts = VmOptions(ssh_port=args.ssh_port, app_port=args.app_port, boot_timeout=args.boot_timeout)
    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

            async def on_signal() -> None:
                async for _ in signals:
                    log.info("powering the VM off")
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(on_signal)
            if args.console:
                clear_run_dir(vm.path / "run")  # an old run's console is not this one's
                tg.start_soon(follow, vm.path / "run" / "console.log")
            async with run_vm(vm, opts) as running:
                print(f"VM up after {time.monotonic() - running.started:.1f} s. Try:\n"
                      f"  {' '.join(running.ssh_argv('status'))}\n"
                      f"  curl http://127.0.0.1:{running.app_port}/\n"
                      f"console log: {running.console}; Ctrl-C powers off", file=sys.stderr)  # fmt: skip
                await running.process.wait()
                log.info("the VM powered off")
            tg.cancel_scope.cancel()
    return 0


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        if args.command == "build":
            from sshfwup.vm.image import build_vm

            vm = build_vm(args.dir, contract=args.contract, rebuild_rootfs=args.rebuild_rootfs)
            print(f"built {vm.disk} (boot contract {args.contract}); run it: sshfwup vm run {vm.path}", file=sys.stderr)
        elif args.command == "firmware":
            from sshfwup.vm.image import VmDir, firmware

            built = firmware(VmDir(args.dir.resolve()), args.version, out=args.output)
            print(f"{built.path} ({built.size} bytes, {'hot' if built.hot else 'reboot'})")
        elif args.command == "run":
            return anyio.run(_run, args)
        elif args.command == "destroy":
            from sshfwup.vm.leftovers import clear_run_dir

            clear_run_dir(args.dir.resolve() / "run")
            if args.dir.exists():
                shutil.rmtree(args.dir)
            print(f"removed {args.dir}", file=sys.stderr)
    except VmError as e:
        print(f"sshfwup vm: {e}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # from run's task group: the operator's error, unwrapped
        errors = group.subgroup(VmError)
        if errors is None:
            raise
        for e in _leaves(errors):
            print(f"sshfwup vm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
