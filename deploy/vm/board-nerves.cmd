# The QEMU device's board variables for deploy/uboot/nerves/boot.cmd (boot contracts uboot-nerves
# and fwup-ops). `sshfwup vm build` runs this after deploy/vm/board.cmd and before the shipped
# script, which stays unchanged.
#
# The shipped script's board section is a BeagleBone's (disk_if=mmc, buffers at 0x82000000, above
# this VM's 1 GiB). Its values are hush locals, and U-Boot looks ${name} up in the environment
# before the locals (cli_hush.c lookup_param), so the values set here, in U-Boot's environment,
# are the ones the script uses. While the script decides and writes, `env import -d` makes the
# disk's environment the whole environment: the factory env carries the same values for that
# part (deploy/vm/contracts/factory-env-nerves.conf, written by `fwup -t complete`).
# They are the bootcount script's own board values, which fit this VM as they are.
setenv disk_if virtio
setenv disk_dev 0
setenv env_addr 0x4000000
setenv env_blk 0x800
setenv env_cnt 0x100
setenv env_size 0x20000
setenv board_addr 0x4100000
