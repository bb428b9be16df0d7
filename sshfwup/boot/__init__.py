"""The boot state: the bootloader's contract (``contract``, one backend per bootloader script:
``uboot_bootcount``, ``uboot_nerves``; chosen by ``backends``) over the environment adapter
(``bootenv``), and the root slots (``slots``).
"""
