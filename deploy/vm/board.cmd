# The QEMU device's board part of its boot script (U-Boot hush). `sshfwup vm build` puts it in
# front of the script shipped for the boot contract (sshfwup/vm/contracts.py), unchanged, and
# compiles the two; for the default uboot-bootcount:
#   cat deploy/vm/board.cmd deploy/uboot/bootcount/boot.cmd > boot.cmd
#   mkimage -A x86 -O linux -T script -C none -n "sshfwup A/B" -d boot.cmd boot.scr
# (uboot-nerves and fwup-ops: deploy/vm/board.cmd, deploy/vm/board-nerves.cmd, then
# deploy/uboot/nerves/boot.cmd, whose own board values are a BeagleBone's.)
# U-Boot's distro boot finds boot.scr on the bootable FAT partition (vda1) and runs it.
#
# The bootcount script's board variables (disk_if=virtio, disk_dev=0, the env at block 0x800,
# 0x100 blocks, 0x20000 bytes; env_addr 0x4000000, board_addr 0x4100000, below U-Boot's
# scriptaddr 0x7000000 in this VM's 1 GiB) already are this device's: it needs only the two
# commands that boot a slot. They go into U-Boot's own environment (this build has no stored
# one: ENV_IS_NOWHERE); the shipped script sets that environment aside while it works on the
# disk's (`env export -t`, `env import -d -c`) and brings it back (`env import -t`) before it
# runs one of them.
#
# A slot: rootfs a = vda2, b = vda3 (squashfs); kernel and initrd in the FAT partition as
# vmlinuz.<slot> and initrd.<slot>. The kernel at 0x3000000, the initrd well above it at
# 0x10000000 (256 MiB: at U-Boot's ramdisk_addr_r, 64 MiB, the decompressed kernel overwrote it).
# Single quotes keep ${filesize} (the initrd's size, known after its load) for the run.
setenv sshfwup_boot_a 'setenv bootargs "root=/dev/vda2 ro rootfstype=squashfs rootwait console=ttyS0,115200 panic=5 quiet"; load virtio 0:1 0x3000000 vmlinuz.a; load virtio 0:1 0x10000000 initrd.a; zboot 0x3000000 0 0x10000000 ${filesize}'
setenv sshfwup_boot_b 'setenv bootargs "root=/dev/vda3 ro rootfstype=squashfs rootwait console=ttyS0,115200 panic=5 quiet"; load virtio 0:1 0x3000000 vmlinuz.b; load virtio 0:1 0x10000000 initrd.b; zboot 0x3000000 0 0x10000000 ${filesize}'
