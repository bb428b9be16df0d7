#!/usr/bin/env bash
# Buildroot post-build script: write sshfwup's manifest (and HOT_RELOAD marker) into the target
# root filesystem, so the device can tell an app-only update (hot reload) from one that needs
# a reboot.
#
# Use it from your defconfig (paths relative to the Buildroot tree):
#   BR2_ROOTFS_POST_BUILD_SCRIPT="board/acme/widget/post-build.sh path/to/sshfwup/deploy/buildroot-post-build.sh"
# Run it last: anything a later script changes in the tree is not in the manifest, and the
# device reboots for app files that differ from it ("app files do not match the manifest").
#
# If permission tables (BR2_ROOTFS_DEVICE_TABLE, a package's FOO_PERMISSIONS) change modes
# below the app directory, use this script as BR2_ROOTFS_POST_FAKEROOT_SCRIPT instead: those
# tables are applied after the post-build scripts, inside fakeroot, right before the image is
# made; a post-fakeroot script sees the final modes.
#
# Buildroot calls it with the target directory as $1 (BR2_ROOTFS_POST_SCRIPT_ARGS follow and are
# ignored here) and with BINARIES_DIR, HOST_DIR, ... in the environment. It reads:
#
#   SSHFWUP_RELOAD       hot     this build is an app-only release (HOT_RELOAD=true)
#                        reboot  this build needs a reboot (HOT_RELOAD=false)
#                        unset   keep the marker that `sshfwup firmware mark --hot|--reboot
#                                output/target` left in the tree; none there: reboot
#   SSHFWUP_APP_DIRS     app directories, space-separated (default: /srv/app)
#   SSHFWUP_KERNEL       kernel image: a path in the rootfs (/boot/zImage) or a file on this
#                        machine; default: the first of zImage Image bzImage uImage in
#                        $BINARIES_DIR; "none": record no kernel
#   SSHFWUP_DTBS         device trees, space-separated, same forms; default: $BINARIES_DIR/*.dtb;
#                        "none": record none
#   SSHFWUP_MARKER_PATH  default /srv/app/HOT_RELOAD (must match [inspect] marker on the device)
#   SSHFWUP              the sshfwup command (default: $HOST_DIR/bin/sshfwup if it exists,
#                        else sshfwup on PATH); may hold arguments, e.g. "python3 -m sshfwup"
#
# Example: an app-only release from the command line:
#   SSHFWUP_RELOAD=hot make
set -euo pipefail

target_dir=${1:?usage: $0 TARGET_DIR (Buildroot passes it)}
binaries_dir=${BINARIES_DIR:-}
marker_path=${SSHFWUP_MARKER_PATH:-/srv/app/HOT_RELOAD}

# The command, split into words on purpose ("python3 -m sshfwup").
if [[ -n ${SSHFWUP:-} ]]; then
  read -r -a sshfwup <<<"$SSHFWUP"
elif [[ -n ${HOST_DIR:-} && -x $HOST_DIR/bin/sshfwup ]]; then
  sshfwup=("$HOST_DIR/bin/sshfwup")
else
  sshfwup=(sshfwup)
fi

args=(firmware manifest "$target_dir" --marker-path "$marker_path")

read -r -a app_dirs <<<"${SSHFWUP_APP_DIRS:-/srv/app}"
for dir in "${app_dirs[@]}"; do
  args+=(--app-dir "$dir")
done

# Kernel: recorded so that a new kernel is always a reboot, even when it lives on a boot
# partition outside the root filesystem.
kernel=${SSHFWUP_KERNEL:-}
if [[ -z $kernel && -n $binaries_dir ]]; then
  for name in zImage Image bzImage uImage; do
    if [[ -f $binaries_dir/$name ]]; then
      kernel=$binaries_dir/$name
      break
    fi
  done
fi
if [[ -n $kernel && $kernel != none ]]; then
  args+=(--kernel "$kernel")
fi

# Device trees, likewise.
if [[ -n ${SSHFWUP_DTBS:-} ]]; then
  if [[ $SSHFWUP_DTBS != none ]]; then
    read -r -a dtbs <<<"$SSHFWUP_DTBS"
    for dtb in "${dtbs[@]}"; do
      args+=(--dtb "$dtb")
    done
  fi
elif [[ -n $binaries_dir ]]; then
  shopt -s nullglob
  for dtb in "$binaries_dir"/*.dtb; do
    args+=(--dtb "$dtb")
  done
  shopt -u nullglob
fi

# The marker: an explicit choice wins; otherwise keep what `sshfwup firmware mark` left; a tree
# without a marker is claimed as a reboot (the safe default).
case ${SSHFWUP_RELOAD:-} in
  hot) args+=(--hot) ;;
  reboot) args+=(--reboot) ;;
  "")
    if [[ ! -e $target_dir$marker_path ]]; then
      args+=(--reboot)
    fi
    ;;
  *)
    echo "buildroot-post-build.sh: SSHFWUP_RELOAD must be hot, reboot or unset, not '$SSHFWUP_RELOAD'" >&2
    exit 2
    ;;
esac

echo "sshfwup: ${sshfwup[*]} ${args[*]}"
"${sshfwup[@]}" "${args[@]}"
