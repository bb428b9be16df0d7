"""The QEMU device: sshfwup on a real boot (U-Boot, a Debian kernel, systemd), no hardware.

Host side only, like :mod:`sshfwup.sim`: ``sshfwup serve`` never imports it. ``sshfwup vm build``
makes the disk image (:mod:`.rootfs`, :mod:`.debpkg`, :mod:`.image`), ``sshfwup vm run`` boots it
(:mod:`.machine`).
"""
