# sshfwup A/B boot script for U-Boot, boot contract "uboot-nerves" ([boot] contract in
# sshfwup.toml; sshfwup/boot/uboot_nerves.py): the decision of a Nerves system's U-Boot
# environment (nerves_init in nerves_system_bbb's uboot.env), written for sshfwup's example layout
# deploy/examples/nerves-bbb-like/. The simulator's bootloader (sshfwup/sim/bootloader.py,
# choose_nerves) makes the same decision.
#
#   mkimage -A arm -O linux -T script -C none -d boot.cmd boot.scr      (boot.scr on the FAT partition)
#
# It needs only the shell (local variables, if/test), setenv, run and env import/export. The
# environment sshfwup and fwup use is a raw area of the disk (/etc/fw_env.config on Linux),
# read and written with env import -c / env export -c; U-Boot's own environment is set aside
# while the script works on the disk's and comes back before the kernel is loaded.
#
# Variables it reads from the disk's environment:
#   nerves_fw_active        a: boot slot a; anything else: slot b (as Nerves' script does)
#   nerves_fw_booted        1: this firmware booted before; anything else: its first boot
#   nerves_fw_validated     0 with nerves_fw_booted=1: the firmware had its one trial and never
#                           validated
#   nerves_fw_autovalidate  1: validate at the first boot (Nerves' default; with sshfwup keep 0,
#                           or U-Boot validates before sshfwup's health check could object)
# and writes, only when something changes:
#   first boot:             nerves_fw_booted=1 (and nerves_fw_validated=1 if autovalidate=1)
#   failed trial:           nerves_fw_active=<the other slot>, nerves_fw_validated=1
# A disk environment that does not import (blank, or a bad CRC): slot a boots, nothing is written.
#
# --- the board (edit these): where the environment is, how to boot a slot ------------------
disk_if=mmc
disk_dev=0
env_addr=0x82000000
env_blk=0x800
env_cnt=0x100
env_size=0x20000
board_addr=0x82100000
# sshfwup_boot_a / sshfwup_boot_b: the board's commands that load zImage.a / zImage.b from the
# FAT partition and the device tree, and boot with root=/dev/mmcblk0p2 / p3. They live in
# U-Boot's own environment (the board's default one, or setenv before this script).

# --- the disk's environment becomes the whole environment while we decide -------------------
env export -t ${board_addr}
board_size=${filesize}
${disk_if} dev ${disk_dev}
${disk_if} read ${env_addr} ${env_blk} ${env_cnt}
save=0
slot=a
# A blank or damaged area (bad CRC) is not imported: U-Boot's own environment would then be the
# one the script works on and writes to the disk. Boot slot a (the slot `fwup -t complete` writes)
# and write nothing: the area stays as it is for Linux's tools to report.
if env import -d -c ${env_addr} ${env_size}; then
    if test "${nerves_fw_booted}" = "1"; then
        if test "${nerves_fw_validated}" = "0"; then
            if test "${nerves_fw_active}" = "a"; then
                echo "sshfwup: slot a never validated, reverting to slot b"
                setenv nerves_fw_active b
            else
                echo "sshfwup: slot b never validated, reverting to slot a"
                setenv nerves_fw_active a
            fi
            setenv nerves_fw_validated 1
            save=1
        fi
else
    setenv nerves_fw_booted 1
    if test "${nerves_fw_autovalidate}" = "1"; then
        setenv nerves_fw_validated 1
    fi
    save=1
fi

if test "${save}" = "1"; then
    env export -c -s ${env_size} ${env_addr}
    ${disk_if} write ${env_addr} ${env_blk} ${env_cnt}
fi
slot=b
if test "${nerves_fw_active}" = "a"; then
    slot=a
fi

else
    echo "sshfwup: no valid environment at block ${env_blk} (blank or bad CRC): booting slot a, writing nothing"
fi

# --- the board's environment back, and boot -------------------------------------------------
env import -t ${board_addr} ${board_size}
echo "sshfwup: booting slot ${slot}"
run sshfwup_boot_${slot}
