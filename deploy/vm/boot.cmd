# sshfwup VM boot script (U-Boot hush), compiled to boot.scr by `sshfwup vm build`:
#   mkimage -A x86 -T script -C none -n "sshfwup A/B" -d deploy/vm/boot.cmd boot.scr
# U-Boot's distro boot finds boot.scr on the bootable FAT partition (vda1) and runs it.
#
# The uboot-bootcount contract (sshfwup/sim/bootloader.py is the same rules in Python):
#   nerves_fw_active     a|b: the slot to boot (anything else: a)
#   nerves_fw_validated  1 once the firmware proved itself (sshfwup sets it; a fallback sets it)
#   upgrade_available    1: the active firmware is on trial (fwup's upgrade on-finish sets it)
#   bootcount            trial boots so far: each trial boot adds one (a lookup, no setexpr here)
#   bootlimit            trial boots allowed (default 3); past it the other slot becomes active
#                        again with nerves_fw_validated=1, upgrade_available=0, bootcount=0
#   nerves_fw_booted     1 on every boot
#   <slot>.nerves_fw_*   describe each slot (written by fwup, only read by sshfwup)
# Where a slot lives: rootfs a = vda2, b = vda3 (squashfs); kernel and initrd of each slot in
# this FAT partition as vmlinuz.<slot> and initrd.<slot>.
#
# The environment lives in a raw area of the disk, not in U-Boot (this build has none of its
# own): 256 blocks at block 2048 (1 MiB, 128 KiB), the place /etc/fw_env.config and
# deploy/vm/fwup.conf name. It is read with `virtio read` + `env import -c` and written back with
# `env export -c` + `virtio write`; `-d` makes the environment exactly the disk's, so the write
# carries no U-Boot defaults.

# Addresses are literals: `env import -d` drops every variable set before it.
#   0x2000000 the env block (128 KiB); 0x3000000 the kernel; 0x10000000 (256 MiB) the initrd
setenv sshfwup_env_ok 0
if virtio read 0x2000000 0x800 0x100; then
  if env import -d -c 0x2000000 0x20000; then
    setenv sshfwup_env_ok 1
  fi
fi
if test "${sshfwup_env_ok}" != "1"; then
  echo "sshfwup: no valid U-Boot environment at block 0x800: booting slot a, nothing saved"
  setenv nerves_fw_active a
fi

if test "${nerves_fw_active}" != "a" && test "${nerves_fw_active}" != "b"; then
  echo "sshfwup: nerves_fw_active '${nerves_fw_active}' is not a slot: booting slot a"
  setenv nerves_fw_active a
fi
if test -z "${bootlimit}"; then
  setenv bootlimit 3
fi

setenv sshfwup_trial 0
if test "${upgrade_available}" = "1"; then
  setenv sshfwup_trial 1
elif test -z "${upgrade_available}" && test "${nerves_fw_validated}" = "0"; then
  setenv sshfwup_trial 1
fi

if test "${sshfwup_trial}" = "1"; then
  # bootcount + 1 by lookup; anything unknown (not a number, >= 9) counts as past any limit
  setenv sshfwup_next 99
  if test -z "${bootcount}"; then setenv sshfwup_next 1; fi
  if test "${bootcount}" = "0"; then setenv sshfwup_next 1; fi
  if test "${bootcount}" = "1"; then setenv sshfwup_next 2; fi
  if test "${bootcount}" = "2"; then setenv sshfwup_next 3; fi
  if test "${bootcount}" = "3"; then setenv sshfwup_next 4; fi
  if test "${bootcount}" = "4"; then setenv sshfwup_next 5; fi
  if test "${bootcount}" = "5"; then setenv sshfwup_next 6; fi
  if test "${bootcount}" = "6"; then setenv sshfwup_next 7; fi
  if test "${bootcount}" = "7"; then setenv sshfwup_next 8; fi
  if test "${bootcount}" = "8"; then setenv sshfwup_next 9; fi
  setenv bootcount ${sshfwup_next}
  if test ${bootcount} -gt ${bootlimit}; then
    echo "sshfwup: slot ${nerves_fw_active} not validated within ${bootlimit} boots: falling back"
    if test "${nerves_fw_active}" = "a"; then
      setenv nerves_fw_active b
    else
      setenv nerves_fw_active a
    fi
    setenv nerves_fw_validated 1
    setenv upgrade_available 0
    setenv bootcount 0
  else
    echo "sshfwup: trial boot ${bootcount} of ${bootlimit} of slot ${nerves_fw_active}"
  fi
fi
setenv nerves_fw_booted 1

# save before anything else can fail, without this script's own variables
setenv sshfwup_next
setenv sshfwup_trial
if test "${sshfwup_env_ok}" = "1"; then
  setenv sshfwup_env_ok
  env export -c -s 0x20000 0x2000000
  virtio write 0x2000000 0x800 0x100
fi

setenv rootpart 2
if test "${nerves_fw_active}" = "b"; then
  setenv rootpart 3
fi
echo "sshfwup: booting slot ${nerves_fw_active} (root /dev/vda${rootpart})"
setenv bootargs "root=/dev/vda${rootpart} ro rootfstype=squashfs rootwait console=ttyS0,115200 panic=5 quiet"
load virtio 0:1 0x3000000 vmlinuz.${nerves_fw_active}
load virtio 0:1 0x10000000 initrd.${nerves_fw_active}
zboot 0x3000000 0 0x10000000 ${filesize}
echo "sshfwup: zboot of slot ${nerves_fw_active} returned"
