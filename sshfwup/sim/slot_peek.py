"""Looking into a device's slots from outside, as tests do: one file of a slot's filesystem, or a
hash of a slot's first bytes in the disk image (what fwup wrote, whatever is mounted)."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from sshfwup.sim.blockdev import run_tool, umount
from sshfwup.sim.device_parts import DeviceParts
from sshfwup.sim.layout import Layout


__all__ = ["read_slot_file", "slot_bytes_sha256"]


def read_slot_file(device: DeviceParts, slot: str, path: str) -> bytes:
    """Read one file from a slot's filesystem (mounted read-only at a temporary directory)."""
    relative = path.lstrip("/")
    if not relative or ".." in Path(relative).parts:
        raise ValueError(f"expected an absolute path inside the root filesystem, got {path!r}")
    device.make_runtime_dirs()
    mount_point = Path(tempfile.mkdtemp(prefix=f"peek-{slot}-", dir=device.run_dir))
    temp_loop: str | None = None
    mounted = False
    try:
        loop = device.loops().get(slot)
        if loop is None:
            offset, size = device.layout.slot_span(slot)
            temp_loop = run_tool(
                ["losetup", "--find", "--show", "--read-only", "--offset", str(offset),
                 "--sizelimit", str(size), str(device.disk)],
                what=f"attaching slot {slot}",
            ).strip()
            block_device = temp_loop
        else:
            block_device = loop.name
            device.flush(block_device)
        run_tool(
            ["mount", "-t", "squashfs", "-o", "ro,nodev,nosuid", block_device, str(mount_point)],
            what=f"mounting slot {slot} ({block_device})",
        )
        mounted = True
        return (mount_point / relative).read_bytes()
    finally:
        if mounted:
            umount(mount_point)
        mount_point.rmdir()
        if temp_loop:
            run_tool(["losetup", "-d", temp_loop], what=f"detaching {temp_loop}")


def slot_bytes_sha256(disk: Path, layout: Layout, slot: str, length: int) -> str:
    """sha256 of the first ``length`` bytes of a slot, read from the disk image ``disk`` itself."""
    offset, size = layout.slot_span(slot)
    if not 0 <= length <= size:
        raise ValueError(f"length must be between 0 and the slot size {size}, got {length}")
    digest = hashlib.sha256()
    with open(disk, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()
