"""The simulated Raspberry-Pi-like firmware: which slot boots under the ``fwup-ops`` contract.

A Raspberry Pi's firmware keeps no boot variables. At power-on it reads ``autoboot.txt`` from the
first (FAT) partition of the boot disk and boots the partition its ``[all]`` section names
(``boot_partition=N``) — unless the restart asked for a tryboot (``reboot "0 tryboot"``, the
parameter fwup's ``reboot_param()`` writes and the reboot hands to the firmware) and
``tryboot_a_b=1``: then it boots the ``[tryboot]`` section's partition, once. The flag lives in
no file on the disk: the next restart without it boots ``[all]`` again, which is the fallback
from a trial that never validated.

This module plays that firmware: ``choose_tryboot`` decides from the file's text, the reboot
parameter and the partition → slot map (a pure function, every branch testable without a disk);
``boot_tryboot`` reads them from a simulated device (the MBR of ``disk.img``, ``autoboot.txt``
through mtools, ``D/reboot-param``) and consumes the parameter, as a restart does. It writes
nothing to the disk: nothing the real firmware would not.
"""

from __future__ import annotations

import logging
import struct
import subprocess
from collections.abc import Mapping
from pathlib import Path

from sshfwup.sim.bootloader import BootChoice
from sshfwup.sim.errors import SimError
from sshfwup.sim.layout import BLOCK_SIZE, SLOTS, Layout

log = logging.getLogger(__name__)

__all__ = ["REBOOT_PARAM", "TrybootError", "boot_tryboot", "choose_tryboot", "mbr_partitions", "parse_autoboot"]

#: the reboot parameter's file in the device directory (fwup's --reboot-param-path there)
REBOOT_PARAM = "reboot-param"
AUTOBOOT = "autoboot.txt"


class TrybootError(SimError):
    """The simulated firmware cannot boot: no autoboot.txt, or it names no slot."""


def parse_autoboot(text: str) -> dict[str, dict[str, str]]:
    """``autoboot.txt``'s sections (``all``, ``tryboot``, ...) and their ``key=value`` lines."""
    sections: dict[str, dict[str, str]] = {"all": {}}
    current = "all"
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
            sections.setdefault(current, {})
        elif "=" in line:
            key, _, value = line.partition("=")
            sections.setdefault(current, {})[key.strip()] = value.strip()
    return sections


def choose_tryboot(autoboot: str, reboot_param: str, slots_by_partition: Mapping[int, str]) -> BootChoice:
    """Decide like the firmware: the ``[tryboot]`` partition once when asked, else ``[all]``'s."""
    sections = parse_autoboot(autoboot)
    tryboot = "tryboot" in reboot_param.split()
    use = "all"
    if tryboot:
        if sections["all"].get("tryboot_a_b") == "1" and "boot_partition" in sections.get("tryboot", {}):
            use = "tryboot"
        else:
            log.warning("tryboot asked for, but autoboot.txt has no tryboot_a_b=1 with a [tryboot] boot_partition")
    value = sections[use].get("boot_partition") or sections["all"].get("boot_partition")
    if value is None or not value.isdigit():
        raise TrybootError(f"{AUTOBOOT} names no boot_partition in [{use}] (it says: {autoboot.strip()!r})")
    partition = int(value)
    slot = slots_by_partition.get(partition)
    if slot is None:
        raise TrybootError(f"{AUTOBOOT} [{use}] boot_partition={partition} is not a slot's partition "
                           f"(slots: {dict(slots_by_partition)})")  # fmt: skip
    if use == "tryboot":
        reason = f"tryboot: booting partition {partition} (slot {slot}) once, as the restart asked"
    else:
        reason = f"booting partition {partition} (slot {slot}), autoboot.txt's default"
    return BootChoice(slot=slot, reason=reason)


def mbr_partitions(disk: Path) -> dict[int, int]:
    """Partition number (1-4) → first block, from the disk's MBR (empty entries left out)."""
    with open(disk, "rb") as f:
        sector = f.read(BLOCK_SIZE)
    if len(sector) < BLOCK_SIZE or sector[510:512] != b"\x55\xaa":
        raise TrybootError(f"{disk} has no MBR")
    out: dict[int, int] = {}
    for i in range(4):
        entry = sector[446 + 16 * i : 446 + 16 * (i + 1)]
        ptype, start = entry[4], struct.unpack_from("<I", entry, 8)[0]
        if ptype:
            out[i + 1] = start
    return out


def _read_autoboot(disk: Path, first_block: int) -> str:
    try:
        proc = subprocess.run(["mtype", "-i", f"{disk}@@{first_block * BLOCK_SIZE}", f"::{AUTOBOOT}"],
                              capture_output=True, timeout=10, check=False)  # fmt: skip
    except FileNotFoundError:
        raise TrybootError("mtype not found: the tryboot-like firmware reads autoboot.txt with mtools") from None
    if proc.returncode != 0:
        raise TrybootError(f"no {AUTOBOOT} on the first partition of {disk}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")  # fmt: skip
    return proc.stdout.decode(errors="replace")


def boot_tryboot(disk: Path, layout: Layout, reboot_param: Path) -> BootChoice:
    """Power-on of the Pi-like firmware on a simulated device; the reboot parameter is used up."""
    partitions = mbr_partitions(disk)
    if 1 not in partitions:
        raise TrybootError(f"{disk}'s MBR has no first partition (the autoboot FAT)")
    slots = {number: slot for number, start in partitions.items() for slot in SLOTS
             if start == layout.rootfs_offset(slot)}  # fmt: skip
    try:
        param = reboot_param.read_text(errors="replace")
    except FileNotFoundError:
        param = ""
    # The restart hands the parameter to the firmware and /run does not survive it.
    reboot_param.unlink(missing_ok=True)
    choice = choose_tryboot(_read_autoboot(disk, partitions[1]), param, slots)
    log.info("Pi-like firmware: %s", choice.reason)
    return choice
