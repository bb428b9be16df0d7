"""Firmware formats shared by the device and the build machine: the root filesystem manifest and
marker (``manifest``), the inspection policy and verdict (``inspect``), and fwup's ``.fw``
archives read as a stream (``archive``, ``zipstream``, ``conf``, ``metaconf``, ``keys``,
``delta_source``, ``errors``). Every error is a :class:`~sshfwup.firmware.errors.FirmwareError`
written for an operator; nothing here imports ``cryptography`` at import time.
"""
