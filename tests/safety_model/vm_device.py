"""The model's QEMU device (sshfwup/vm): the same events and checks as on the simulated device,
on a real boot (U-Boot, the Debian kernel, systemd, the real fwup writing /dev/vda) under the
QEMU device's contract, uboot-bootcount.

What the model reads, and how:

- the boot record: the guest's ``fw_printenv`` (its /etc/fw_env.config: the U-Boot env area of
  /dev/vda), every variable, through the guest agent;
- the machine's state: its boot count is the number of U-Boot banners on the serial console (one
  per power-on, reboot or reset), the running slot the guest's mount table (``findmnt /``), and it
  is up and ready when sshfwup.service is active (Type=notify: after sshfwup's READY=1);
- slot hashes: ``dd iflag=direct`` of /dev/vda2 and /dev/vda3 (the device's bytes, not the guest's
  page cache: fwup writes through /dev/vda) piped to sha256sum in the guest, the first
  ``slot_bytes`` of each: every byte a firmware image of the session reaches, plus a margin (what
  fwup writes starts at the slot's start; the 256 MiB slot's tail past that is not read, which
  saves a third of the slowest part of every snapshot under TCG);
- a power cut: QEMU killed with SIGKILL and started again on the same overlay
  (``sshfwup.vm.machine.kill_power``, as tests/vm/test_vm_faults.py does), at a seeded moment of
  the upload (``power_cut_delay``).

The serial console has U-Boot's and the kernel's lines, not sshfwup's (journald does not forward
to it): the model's reading of "the device validated itself before the cut" comes from the
boot record only on this device (changes.self_validation), not from the console.

Firmware comes from a ``FirmwarePool``: built once per session from the VM directory's staging/
(``sshfwup.vm.image.firmware``), versions only going up; two families — "plain" (the factory's
tree) and "rel" (a file under /etc added) — so that within a family only /srv/app differs (a hot
update) and across families a file outside it (a reboot). Uploads the pool cannot make (another
platform, a broken app) raise ``UnsupportedFirmware``: their events are not walked on this device
(``VM_EVENTS``).
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sshfwup.vm.agent import AgentError, Exec, guest_exec, wait_agent
from sshfwup.vm.contracts import DEFAULT_CONTRACT as CONTRACT
from sshfwup.vm.image import FIRST_VERSION, VmDir, firmware
from sshfwup.vm.machine import Running, VmOptions, console_tail, kill_power, run_vm

from .contracts import contract
from .device import ModelledDevice, ModelViolation
from .space import StateSpace
from .walk import draw_pairs

T = TypeVar("T")

SLOT_DEVICES = {"a": "/dev/vda2", "b": "/dev/vda3"}  # deploy/vm/fwup.conf, sshfwup.toml's [device]
SLOT_SIZE = 524288 * 512  # ROOTFS_A_PART_COUNT blocks (deploy/vm/fwup.conf)
RELEASE = "etc/sshfwup-vm-release"  # a file outside /srv/app: present in the "rel" family only
FAMILIES = ("plain", "rel")
# The events the pool's firmware can drive (no other platform, no broken app: UnsupportedFirmware).
VM_EVENTS = ("hot-upload", "reboot-upload", "bad-upload:garbage", "bad-upload:flipped", "cut-upload",
             "slow-tail-upload", "power-cut", "reboot", "validate", "revert", "same-upload")  # fmt: skip


# The pairs a sampled walk on this device always fires.
ALWAYS = (
    ("settled/validated/other-empty", "hot-upload"),  # the factory device's first update
    ("settled/validated/other-whole", "power-cut"),  # a cut anywhere in an upload next to a whole fallback
)
# The states a draw comes from: those a walk reaches on purpose on this device without booting
# another one. Not settled/unvalidated (the device validates a first boot 5 s after its app is
# ready — the image's observe — sooner than the model's reads through the guest agent get there
# under TCG), not other-rolled-back (needs a broken app), not other-empty (only a factory-fresh
# device is there: each pair would boot a VM, ~2 min; ALWAYS walks its hot upload).
VM_STATES = ("settled/validated/other-whole", "settled/validated/other-incomplete", "pending/unvalidated/other-whole")


def vm_sample(contract_space: StateSpace, seed: int, n: int) -> tuple[tuple[str, str], ...]:
    """``n`` of the pairs this device walks, drawn with ``seed``, then ``ALWAYS``. (The walk fires
    the pairs of the state it is in in this order: the draw's before the power cut, which leaves
    the state more often than not.)"""
    rest = [p for p in contract_space.pairs if p[0] in VM_STATES and p[1] in VM_EVENTS and p not in ALWAYS]
    return (*draw_pairs(rest, n, f"vm:{contract_space.name}:{seed}"), *ALWAYS)


class UnsupportedFirmware(ValueError):
    """The QEMU device's firmware pool cannot build what an event asked for."""


class Guest(Protocol):
    """tests/vm/vmkit.Device: the running VM and the portal its async helpers run through."""

    running: Running

    def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...


@dataclass(frozen=True)
class VmState:
    """The QEMU machine as the model's waits read it (the simulator's MachineState's fields)."""

    state: str  # up (sshfwup.service active) | booting (the agent answers, sshfwup not ready) | down
    ready: bool
    boot_count: int
    slot: str | None


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def other_family(family: str) -> str:
    return FAMILIES[1 - FAMILIES.index(family)]


class FirmwarePool:
    """The session's firmware for the QEMU device: ``prebuild`` versions (1.1.0, 1.2.0, ...;
    odd minor "rel", even "plain") built one after another on a worker thread as soon as the pool
    is made (staging/ is shared: one build at a time), more on demand; a kept VM directory
    (``SSHFWUP_VM_DIR``) reuses the files of an earlier session. ``take`` hands out each version
    once, always above every version handed out before (sshfwup refuses a downgrade)."""

    def __init__(self, vm: VmDir, prebuild: int = 8) -> None:
        self.vm = vm
        self.families: dict[str, str] = {FIRST_VERSION: "plain"}  # the factory's 1.0.0: staging as built
        self.paths: dict[str, Path] = {FIRST_VERSION: vm.fw_dir / f"{FIRST_VERSION}.fw"}
        self._builds: dict[str, Future[Path]] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="vm-firmware")
        self._lock = threading.Lock()
        self._last = _key(FIRST_VERSION)
        self._minor = 0
        for _ in range(prebuild):
            self._plan(FAMILIES[(self._minor + 1) % 2])  # odd minor: rel

    def _plan(self, family: str) -> str:
        self._minor += 1
        version = f"1.{self._minor}.0"
        self.families[version] = family
        self._builds[version] = self._worker.submit(self._build, version, family)
        return version

    def _build(self, version: str, family: str) -> Path:
        out = self.vm.fw_dir / f"model-{version}-{family}.fw"
        if out.is_file():
            return out
        release = self.vm.staging / RELEASE
        if family == "plain":
            release.unlink(missing_ok=True)
        else:
            release.write_text("rel\n")
        partial = out.with_suffix(".partial")  # an interrupted build is never taken for a firmware
        firmware(self.vm, version, out=partial)
        partial.replace(out)
        return out

    def take(self, family: str, timeout: float = 900) -> tuple[str, Path]:
        """The lowest version of ``family`` above every version handed out (built if need be)."""
        with self._lock:
            above = [v for v in self._builds if _key(v) > self._last and self.families[v] == family]
            version = min(above, key=_key) if above else self._plan(family)
            self._last = _key(version)
        path = self._builds[version].result(timeout=timeout)
        self.paths[version] = path
        return version, path

    @property
    def largest(self) -> int:
        """Bytes of the largest firmware file built so far (an upper bound of its root filesystem)."""
        return max((p.stat().st_size for p in self.paths.values() if p.is_file()), default=SLOT_SIZE)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)


class VmFirmwares:
    """``Firmwares`` for one QEMU device: a hot firmware is the next of the running firmware's
    family, a reboot-requiring one (``changes=...``) the next of the other family."""

    def __init__(self, pool: FirmwarePool, running_version: Callable[[], str]) -> None:
        self.pool = pool
        self.running_version = running_version
        self.crashing: set[str] = set()  # the pool builds no crashing app

    @property
    def by_version(self) -> dict[str, Path]:
        return self.pool.paths

    def make(self, **kwargs: Any) -> tuple[str, Path]:
        # "filler" (a big file, so that a cut lands in the data) is ignored: the QEMU device's
        # firmware is tens of MB of root filesystem already
        unsupported = sorted(set(kwargs) - {"changes", "filler"})
        if unsupported:
            raise UnsupportedFirmware(f"the QEMU device's firmware pool builds no firmware with {unsupported}")
        family = self.pool.families.get(self.running_version(), "plain")
        return self.pool.take(other_family(family) if kwargs.get("changes") else family)


def _printenv_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@dataclass(frozen=True)
class _EnvReader:
    """What a contract's boot_record reads a U-Boot env from (``device.env()``)."""

    read: Callable[[], dict[str, str]]

    def env(self) -> dict[str, str]:
        return self.read()


class VmModelDevice(ModelledDevice):
    """One booted QEMU device (a fresh overlay on the factory disk) under uboot-bootcount, with the
    model's bookkeeping. ``stop`` powers the VM off and removes its overlay."""

    # TCG on a loaded 2-core machine: a boot takes 1-2 min, an upload of the ~180 MB firmware minutes
    SETTLE_TIMEOUT = 420.0
    REBOOT_START_TIMEOUT = 240.0  # sshfwup's reboot: the app drained, systemd's shutdown, then U-Boot
    VERDICT_TIMEOUT = 420.0
    UPLOAD_TIMEOUT = 900.0
    CHECK_GRACE = 30.0  # the first-boot validation: observe = 5 s after the app's readiness, reads are slow
    POLL = 1.0
    BOOT_LINE = re.compile(r"^U-Boot 20\d\d", re.M)  # U-Boot's banner, each power-on and reset

    def __init__(self, guest: Guest, stop: Callable[[], None], pool: FirmwarePool, *, cut_delays: random.Random,
                 contract_name: str = CONTRACT, slot_bytes: int | None = None) -> None:  # fmt: skip
        self.guest = guest
        self._stop = stop
        self.spec = contract(contract_name)
        if self.spec.name != CONTRACT:
            raise ValueError(f"the QEMU device boots under {CONTRACT} (deploy/vm/board.cmd), not {contract_name}")
        self.key = guest.running.vm.key
        self.cut_delays = cut_delays
        self.firmwares = VmFirmwares(pool, self._running_version)
        # every byte a firmware image of this session reaches, rounded up to MiB, plus 8 MiB
        self.slot_bytes = slot_bytes or min(SLOT_SIZE, (pool.largest // (1 << 20) + 9) * (1 << 20))
        self._start_bookkeeping()
        self.settle(boot=1)
        self._check_factory_env()

    # --- the primitives ------------------------------------------------------------------------

    def sh(self, command: str, timeout: float = 60) -> Exec:
        """``command`` as root on the device, through the guest agent."""
        return self.guest.call(lambda: guest_exec(self.guest.running.agent, ["/bin/sh", "-c", command],
                                                  timeout=timeout))  # fmt: skip

    def ssh_argv(self, *args: str, subsystem: bool = False) -> list[str]:
        argv = self.guest.running.ssh_argv(*args)
        if subsystem:
            argv.insert(len(argv) - len(args) - 1, "-s")  # before root@127.0.0.1
        return argv

    def _printenv(self) -> dict[str, str]:
        try:
            result = self.sh("fw_printenv", timeout=30)
        except AgentError as e:
            raise ModelViolation(f"the boot env could not be read: {e}") from None
        if result.status != 0:
            raise ModelViolation(f"fw_printenv failed (exit {result.status}): {result.stderr.strip()}")
        return _printenv_lines(result.stdout)

    def env(self) -> dict[str, str]:
        return self.spec.boot_record(_EnvReader(self._printenv))

    def state(self) -> VmState:
        boots = len(self.BOOT_LINE.findall(self.console()))
        try:
            result = self.sh("findmnt -n -o SOURCE /; systemctl is-active sshfwup", timeout=15)
        except AgentError:
            return VmState("down", False, boots, None)
        lines = result.stdout.split()
        slot = {dev: s for s, dev in SLOT_DEVICES.items()}.get(lines[0] if lines else "")
        ready = lines[-1:] == ["active"]
        return VmState("up" if ready else "booting", ready, boots, slot)

    def console(self) -> str:
        try:
            return self.guest.running.console.read_bytes().decode(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def console_tail(self) -> str:
        return console_tail(self.guest.running.console)

    def gone(self) -> str | None:
        if self.guest.running.process.returncode is None:
            return None
        return f"QEMU exited with status {self.guest.running.process.returncode}\n{self.console_tail()}"

    def slot_sha256(self, slot: str, nbytes: int | None = None) -> str:
        count = (self.slot_bytes if nbytes is None else nbytes) // (1 << 20)
        command = f"dd if={SLOT_DEVICES[slot]} bs=1M count={count} iflag=direct status=none | sha256sum"
        try:
            result = self.sh(command, timeout=180)
        except AgentError as e:
            raise ModelViolation(f"slot {slot} could not be read: {e}") from None
        digest = result.stdout.split()[0] if result.stdout.split() else ""
        if result.status != 0 or len(digest) != 64:
            raise ModelViolation(f"reading slot {slot} failed (exit {result.status}): {result.stderr.strip()}")
        return digest

    def power_cut(self) -> None:
        self.guest.call(lambda: kill_power(self.guest.running))

    def power_cut_delay(self) -> float:
        """Seconds into the upload: from its SSH handshake to fwup's last writes and the hot swap
        (an upload of the pool's firmware takes about a minute under TCG)."""
        delay = round(self.cut_delays.uniform(2.0, 60.0), 1)
        self.log.append(f"(power cut {delay} s into the upload)")
        return delay

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.guest.running.app_port}/"

    def close(self) -> None:
        self._stop()

    def _running_version(self) -> str:
        app = self.status().get("app") or {}
        return str(app.get("version") or FIRST_VERSION)


def power_on(vm: VmDir, portal: Any, guest_for: Callable[[Running], Guest], pool: FirmwarePool,
             cut_delays: random.Random) -> VmModelDevice:  # fmt: skip
    """A fresh QEMU device: the factory disk on a new overlay, booted, its first boot settled.
    Powered off again (and its overlay removed) if it does not come up."""
    vm_context = portal.wrap_async_context_manager(run_vm(vm, VmOptions(boot_timeout=300)))
    running = vm_context.__enter__()

    def stop() -> None:
        vm_context.__exit__(None, None, None)

    try:
        portal.call(lambda: wait_agent(running.agent, time.monotonic() + 180))
        return VmModelDevice(guest_for(running), stop, pool, cut_delays=cut_delays)
    except BaseException:
        stop()
        raise


__all__ = [
    "ALWAYS", "VM_EVENTS", "VM_STATES", "FirmwarePool", "UnsupportedFirmware", "VmFirmwares", "VmModelDevice", "VmState",
    "power_on", "vm_sample",
]  # fmt: skip
