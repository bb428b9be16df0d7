#!/usr/bin/env bash
# A plain firmware build without a build system: staging tree → manifest → squashfs → .fw.
#
#   deploy/mksquashfs-flow.sh STAGING_DIR VERSION OUT.fw [--hot | --reboot]
#
#   1. sshfwup firmware manifest STAGING_DIR ...   manifest (and marker) into the tree
#   2. mksquashfs STAGING_DIR rootfs.squashfs      the root filesystem image
#   3. fwup -c -f deploy/fwup.conf -o OUT.fw       the firmware archive (ROOTFS=..., version)
#   4. sshfwup firmware sign OUT.fw                only with SSHFWUP_SIGNING_KEY
#   5. sshfwup firmware info OUT.fw                what the device will see
#
# Without --hot/--reboot the marker already in the tree is kept (`sshfwup firmware mark`), and
# a tree without one is marked --reboot. Before shipping, compare with the last release:
#   sshfwup firmware diff last-release.fw OUT.fw --fail-on-reboot
#
# Environment:
#   SSHFWUP              the sshfwup command (default: sshfwup; may hold arguments)
#   FWUP                 the fwup command (default: fwup)
#   FWUP_CONF            fwup configuration (default: fwup.conf next to this script)
#   SSHFWUP_APP_DIRS     app directories, space-separated (default: /srv/app)
#   SSHFWUP_KERNEL       kernel: a path in the tree or a file on this machine
#                        (default: /boot/zImage if the tree has it; "none": record none)
#   SSHFWUP_DTBS         device trees, space-separated, same forms (default: /boot/*.dtb in the tree)
#   SSHFWUP_SIGNING_KEY  fwup private key (fwup-key.priv): sign the result
#   MKSQUASHFS_OPTS      extra mksquashfs options, e.g. "-comp xz"
#   SOURCE_DATE_EPOCH    honoured by mksquashfs and fwup for reproducible output
set -euo pipefail

usage() {
  echo "usage: $0 STAGING_DIR VERSION OUT.fw [--hot | --reboot]" >&2
  exit 2
}
[[ $# -ge 3 && $# -le 4 ]] || usage
staging=$1
version=$2
out=$3
mark=${4:-}
case $mark in
  "" | --hot | --reboot) ;;
  *) usage ;;
esac
[[ -d $staging ]] || { echo "$0: $staging: not a directory" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a sshfwup <<<"${SSHFWUP:-sshfwup}"
read -r -a fwup <<<"${FWUP:-fwup}"
fwup_conf=${FWUP_CONF:-$here/fwup.conf}
read -r -a mksquashfs_opts <<<"${MKSQUASHFS_OPTS:-}"

work=$(mktemp -d "${TMPDIR:-/tmp}/sshfwup-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. manifest (+ marker)
args=(firmware manifest "$staging")
read -r -a app_dirs <<<"${SSHFWUP_APP_DIRS:-/srv/app}"
for dir in "${app_dirs[@]}"; do
  args+=(--app-dir "$dir")
done
kernel=${SSHFWUP_KERNEL:-}
if [[ -z $kernel && -f $staging/boot/zImage ]]; then
  kernel=/boot/zImage
fi
if [[ -n $kernel && $kernel != none ]]; then
  args+=(--kernel "$kernel")
fi
if [[ -n ${SSHFWUP_DTBS:-} ]]; then
  read -r -a dtbs <<<"$SSHFWUP_DTBS"
else
  dtbs=()
  shopt -s nullglob
  for dtb in "$staging"/boot/*.dtb; do
    dtbs+=("/boot/${dtb##*/}")
  done
  shopt -u nullglob
fi
for dtb in "${dtbs[@]}"; do
  [[ $dtb == none ]] || args+=(--dtb "$dtb")
done
if [[ -n $mark ]]; then
  args+=("$mark")
elif [[ ! -e $staging/srv/app/HOT_RELOAD ]]; then
  args+=(--reboot)
fi
"${sshfwup[@]}" "${args[@]}"

# 2. the root filesystem image: every file owned by root (the manifest records no owners, the
# device expects root), no extended attributes from the build machine.
mksquashfs "$staging" "$work/rootfs.squashfs" -noappend -all-root -no-xattrs -quiet -no-progress \
  "${mksquashfs_opts[@]}"

# 3. the firmware archive; deploy/fwup.conf takes the image from $ROOTFS (an absolute path:
# fwup resolves a relative one against the conf file's folder) and the version from
# $NERVES_FW_VERSION (fwup's define() keeps a value the environment sets).
mkdir -p "$(dirname "$out")"
ROOTFS=$work/rootfs.squashfs NERVES_FW_VERSION=$version "${fwup[@]}" -c -f "$fwup_conf" -o "$out"

# 4. signature
if [[ -n ${SSHFWUP_SIGNING_KEY:-} ]]; then
  "${sshfwup[@]}" firmware sign "$out" --private-key "$SSHFWUP_SIGNING_KEY"
fi

# 5. what the device will see
"${sshfwup[@]}" firmware info "$out"
