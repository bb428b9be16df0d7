# sshfwup A/B boot script for U-Boot, boot contract "uboot-bootcount" ([boot] contract in
# sshfwup.toml; sshfwup/boot/uboot_bootcount.py). The simulator's bootloader
# (sshfwup/sim/bootloader.py, choose_boot) makes the same decision; the QEMU device runs this file.
#
#   mkimage -A x86 -O linux -T script -C none -d boot.cmd boot.scr     (then U-Boot: source)
#
# It needs only the shell (local variables, if/test), setenv, run, and env import/export: no
# setexpr (Debian's qemu-x86 U-Boot has none), so a boot is counted by looking up the next value.
# The environment sshfwup and fwup use is a raw area of the disk (/etc/fw_env.config on Linux),
# read and written here with env import -c / env export -c; U-Boot's own environment stays
# whatever the board has (it is set aside while the script works on the disk's).
#
# Variables it reads from the disk's environment:
#   nerves_fw_active      a | b: the slot to boot (anything else: a, written back)
#   upgrade_available     1: the firmware in nerves_fw_active has not validated yet (a trial);
#                         unset: nerves_fw_validated=0 means the same
#   bootcount             trial boots so far (0..9; anything else counts as 0)
#   bootlimit             trial boots allowed (0..9; unset or anything else: 3)
# and writes, only when a value changes:
#   bootcount             +1 on each trial boot
#   nerves_fw_active, nerves_fw_validated=1, upgrade_available=0, bootcount=0
#                         once bootcount would pass bootlimit: the other slot boots, as proven
#   nerves_fw_booted=1    on every boot
# A disk environment that does not import (blank, or a bad CRC): slot a boots, nothing is written.
#
# --- the board (edit these): where the environment is, and how to boot a slot --------------
disk_if=virtio
disk_dev=0
env_addr=0x4000000
env_blk=0x800
env_cnt=0x100
env_size=0x20000
board_addr=0x4100000
# sshfwup_boot_a / sshfwup_boot_b: the board's commands that load and start the kernel of a slot
# with root= that slot (e.g. "load virtio 0:1 ${kernel_addr_r} /boot/bzImage; zboot ...").
# They live in U-Boot's own environment (the board's default one, or setenv before this script).

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
    if test "${nerves_fw_active}" != "a" && test "${nerves_fw_active}" != "b"; then
        echo "sshfwup: nerves_fw_active is not a slot, booting slot a"
        setenv nerves_fw_active a
        save=1
    fi

    trial=0
    if test "${upgrade_available}" = "1"; then
        trial=1
    elif test -z "${upgrade_available}" && test "${nerves_fw_validated}" = "0"; then
        trial=1
    fi

    if test "${trial}" = "1"; then
        # bootcount + 1, by lookup (no setexpr); anything unexpected counts as 0
        next=1
        if test "${bootcount}" = "1"; then next=2; fi
        if test "${bootcount}" = "2"; then next=3; fi
        if test "${bootcount}" = "3"; then next=4; fi
        if test "${bootcount}" = "4"; then next=5; fi
        if test "${bootcount}" = "5"; then next=6; fi
        if test "${bootcount}" = "6"; then next=7; fi
        if test "${bootcount}" = "7"; then next=8; fi
        if test "${bootcount}" = "8"; then next=9; fi
        if test "${bootcount}" = "9"; then next=10; fi
        limit=3
        if test "${bootlimit}" = "0"; then limit=0; fi
        if test "${bootlimit}" = "1"; then limit=1; fi
        if test "${bootlimit}" = "2"; then limit=2; fi
        if test "${bootlimit}" = "4"; then limit=4; fi
        if test "${bootlimit}" = "5"; then limit=5; fi
        if test "${bootlimit}" = "6"; then limit=6; fi
        if test "${bootlimit}" = "7"; then limit=7; fi
        if test "${bootlimit}" = "8"; then limit=8; fi
        if test "${bootlimit}" = "9"; then limit=9; fi
        if test ${next} -gt ${limit}; then
            echo "sshfwup: slot ${nerves_fw_active} did not validate within ${limit} boots, falling back"
            if test "${nerves_fw_active}" = "a"; then
                setenv nerves_fw_active b
            else
                setenv nerves_fw_active a
            fi
            setenv nerves_fw_validated 1
            setenv upgrade_available 0
            setenv bootcount 0
        else
            echo "sshfwup: trial boot ${next} of ${limit} of slot ${nerves_fw_active}"
            setenv bootcount ${next}
        fi
        save=1
    fi

    if test "${nerves_fw_booted}" != "1"; then
        setenv nerves_fw_booted 1
        save=1
    fi

    if test "${save}" = "1"; then
        env export -c -s ${env_size} ${env_addr}
        ${disk_if} write ${env_addr} ${env_blk} ${env_cnt}
    fi
    slot=${nerves_fw_active}
else
    echo "sshfwup: no valid environment at block ${env_blk} (blank or bad CRC): booting slot a, writing nothing"
fi

# --- the board's environment back, and boot -------------------------------------------------
env import -t ${board_addr} ${board_size}
echo "sshfwup: booting slot ${slot}"
run sshfwup_boot_${slot}
