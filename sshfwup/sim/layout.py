"""The simulated device's disk layout: Nerves-style A/B with a U-Boot environment.

One source of truth for offsets: the firmware builder compiles it into meta.conf, the
simulator attaches loop devices at these offsets, and ``deploy/fwup.conf`` spells out the
same numbers for the real fwup.

    block 0         MBR (partition 0 = rootfs A, 1 = rootfs B, 2 = app data)
    UBOOT_ENV       U-Boot environment (little-endian CRC32 + name=value\\0 pairs)
    ROOTFS_A        squashfs root filesystem, slot a
    ROOTFS_B        squashfs root filesystem, slot b
    APP             app data partition (ext4), holds sshfwup's data directory
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK_SIZE = 512
SLOTS = ("a", "b")
ROLES = ("a", "b", "app")  # the partitions: each gets its own loop device

__all__ = ["BLOCK_SIZE", "DEFAULT_LAYOUT", "ROLES", "SLOTS", "Layout"]


@dataclass(frozen=True)
class Layout:
    uboot_env_offset: int = 2048  # blocks: 1 MiB
    uboot_env_count: int = 256  # blocks: 128 KiB
    rootfs_a_offset: int = 4096  # blocks: 2 MiB
    rootfs_count: int = 65536  # blocks: 32 MiB per slot
    app_count: int = 32768  # blocks: 16 MiB
    platform: str = "sshfwup-sim"
    architecture: str = "x86_64"
    product: str = "sshfwup simulated device"

    @property
    def rootfs_b_offset(self) -> int:
        return self.rootfs_a_offset + self.rootfs_count

    @property
    def app_offset(self) -> int:
        return self.rootfs_b_offset + self.rootfs_count

    @property
    def disk_blocks(self) -> int:
        return self.app_offset + self.app_count

    @property
    def disk_bytes(self) -> int:
        return self.disk_blocks * BLOCK_SIZE

    def rootfs_offset(self, slot: str) -> int:
        """First block of a slot's root filesystem."""
        return {"a": self.rootfs_a_offset, "b": self.rootfs_b_offset}[slot]

    def slot_span(self, slot: str) -> tuple[int, int]:
        """(byte offset, byte size) of a slot inside the disk image, for ``losetup -o/--sizelimit``."""
        return self.rootfs_offset(slot) * BLOCK_SIZE, self.rootfs_count * BLOCK_SIZE

    @property
    def app_span(self) -> tuple[int, int]:
        return self.app_offset * BLOCK_SIZE, self.app_count * BLOCK_SIZE

    @property
    def uboot_env_span(self) -> tuple[int, int]:
        return self.uboot_env_offset * BLOCK_SIZE, self.uboot_env_count * BLOCK_SIZE


DEFAULT_LAYOUT = Layout()
