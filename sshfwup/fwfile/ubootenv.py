"""U-Boot environment blocks, as fwup and libubootenv's fw_printenv/fw_setenv read and write them.

A block is a little-endian CRC32 of the rest of the block, then ``name=value\\0`` pairs sorted
by name, a final ``\\0``, and 0xff fill. Where a block lives on the disk is meta.conf's
``uboot-environment`` section (:class:`sshfwup.fwfile.metaconf.UBootEnvironment`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping

from .errors import UBootEnvError


def write_uboot_env(block_size: int, env: Mapping[str, str]) -> bytes:
    """A U-Boot environment block: CRC32 (LE), sorted ``name=value\\0`` pairs, ``\\0``, 0xff fill."""
    body = bytearray()
    for name in sorted(env, key=lambda n: n.encode("utf-8")):
        value = env[name]
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise UBootEnvError(f"U-Boot variable {name!r} cannot be stored (empty, '=' or NUL)")
        body += f"{name}={value}".encode("utf-8") + b"\0"
    body += b"\0"
    if 4 + len(body) > block_size - 1:
        raise UBootEnvError(f"U-Boot environment needs {4 + len(body)} bytes; the block holds {block_size}",
                            fwup_message="Not enough room in U-boot environment")
    data = bytes(body) + b"\xff" * (block_size - 4 - len(body))
    return struct.pack("<I", zlib.crc32(data)) + data


def parse_uboot_env(block: bytes) -> dict[str, str]:
    """The variables of a U-Boot environment block; UBootEnvError if its CRC32 does not match."""
    if len(block) < 5:
        raise UBootEnvError(f"U-Boot environment block is only {len(block)} bytes")
    (expected,) = struct.unpack_from("<I", block)
    actual = zlib.crc32(block[4:])
    if expected != actual:
        raise UBootEnvError(
            f"U-Boot environment CRC32 mismatch (expected 0x{expected:08x}; got 0x{actual:08x})",
            fwup_message=f"U-boot environment CRC32 mismatch (expected 0x{expected:08x}; got 0x{actual:08x})",
        )
    env: dict[str, str] = {}
    pos = 4
    while pos < len(block) and block[pos] != 0:
        end = block.find(b"\0", pos)
        if end < 0:
            raise UBootEnvError("invalid U-Boot environment: a variable is not terminated",
                                fwup_message="Invalid U-boot environment")
        name, sep, value = block[pos:end].partition(b"=")
        if not sep:
            raise UBootEnvError(f"invalid U-Boot environment: {name!r} has no '='",
                                fwup_message="Invalid U-boot environment")
        env[name.decode("utf-8", errors="replace")] = value.decode("utf-8", errors="replace")
        pos = end + 1
    return env
