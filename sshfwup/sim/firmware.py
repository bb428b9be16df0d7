"""Build firmware for the simulated device: the same code as ``sshfwup firmware build``.

The simulator, the demo, the benchmarks and the tests build every ``.fw`` through
:mod:`sshfwup.host.firmware_build` (reproducible squashfs, real ``fwup -c -f deploy/fwup.conf``);
this module keeps the names they import.
"""

from __future__ import annotations

from sshfwup.host.firmware_build import SQUASHFS_TIME, build_firmware, build_squashfs, find_fwup, reference_conf

__all__ = ["SQUASHFS_TIME", "build_firmware", "build_squashfs", "find_fwup", "reference_conf"]
