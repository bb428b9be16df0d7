#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmarks need. Idempotent; run as root on
# Debian 12 (the commands in README.md call it for you; without root it re-runs itself with sudo).
#
# fwup: a `fwup` on PATH of version >= $FWUP_VERSION is used as it is. Otherwise fwup is built
# from source and installed to /usr/local: from the tarball FWUP_SOURCE names (CI points it at
# ../shared/vendor/fwup), else from fwup's official release tarball of the pinned version.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=FWUP_SOURCE,PYTHON,CI,SSHFWUP_VENV,SSHFWUP_LOCK "$0" "$@"
  fi
  echo "bootstrap: run this as root (it installs Debian packages, builds fwup and uses loop devices)" >&2
  exit 1
fi

FWUP_VERSION=1.16.0
FWUP_RELEASE_URL="https://github.com/fwup-home/fwup/releases/download/v$FWUP_VERSION/fwup-$FWUP_VERSION.tar.gz"

# Another apt (unattended-upgrades on a fresh VM) may hold the dpkg lock: wait for it, bounded.
apt_get() {
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@"
}

# Debian packages: the real tools sshfwup drives (OpenSSH clients and, for the benchmarks, sshd;
# libubootenv's fw_printenv/fw_setenv; mksquashfs; mkfs.ext4; losetup/mount), load generators,
# systemd-analyze for checking the unit file, and what building fwup needs; for the QEMU device
# (sshfwup vm, tests/vm): QEMU, Debian's U-Boot for it, mkimage, mmdebstrap, FAT tools, dpkg-deb;
# the other SSH clients users update devices with (tests/ssh/test_clients.py): PuTTY's plink and
# pscp, Dropbear's dbclient.
packages=(
  openssh-client openssh-server putty-tools dropbear-bin libubootenv-tool squashfs-tools e2fsprogs util-linux mount
  wrk hey systemd shellcheck python3-venv ca-certificates xdelta3
  build-essential pkg-config libconfuse-dev libarchive-dev zlib1g-dev curl iproute2 procps
  qemu-system-x86 qemu-utils u-boot-qemu u-boot-tools mmdebstrap mtools dosfstools dpkg-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  apt_get update -qq
  apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The loop driver must be there for the simulated device's slots.
if [ ! -e /dev/loop-control ]; then
  modprobe loop 2>/dev/null || true
fi

# fwup: the real one, >= FWUP_VERSION.
fwup_ok() {
  local have
  have=$(fwup --version 2>/dev/null) || return 1
  [ "$(printf '%s\n%s\n' "$FWUP_VERSION" "$have" | sort -V | head -n 1)" = "$FWUP_VERSION" ]
}
if ! fwup_ok; then
  build=$(mktemp -d /tmp/sshfwup-fwup-build.XXXXXX)
  trap 'rm -rf "$build"' EXIT
  if [ -n "${FWUP_SOURCE:-}" ]; then
    [ -f "$FWUP_SOURCE" ] || { echo "bootstrap: FWUP_SOURCE=$FWUP_SOURCE: no such file" >&2; exit 1; }
    tarball=$FWUP_SOURCE
  else
    tarball=$build/fwup-$FWUP_VERSION.tar.gz
    echo "bootstrap: no fwup >= $FWUP_VERSION on PATH and FWUP_SOURCE unset; downloading $FWUP_RELEASE_URL" >&2
    if ! curl -fsSL --connect-timeout 20 --max-time 300 -o "$tarball" "$FWUP_RELEASE_URL"; then
      cat >&2 <<EOF
bootstrap: cannot get fwup's source ($FWUP_RELEASE_URL).
  fwup >= $FWUP_VERSION is needed and is not in Debian's archive. Either install it (a fwup
  package for your distribution, or https://github.com/fwup-home/fwup#installing), or point
  FWUP_SOURCE at fwup's source tarball, e.g.
    FWUP_SOURCE=/path/to/fwup-$FWUP_VERSION-src.tar.gz $0
EOF
      exit 1
    fi
  fi
  echo "bootstrap: building fwup from $tarball" >&2
  tar -xzf "$tarball" -C "$build"
  src=$(find "$build" -mindepth 1 -maxdepth 1 -type d -name 'fwup*' | head -n 1)
  [ -n "$src" ] || { echo "bootstrap: $tarball holds no fwup source directory" >&2; exit 1; }
  (
    cd "$src"
    [ -x configure ] || ./autogen.sh
    ./configure --prefix=/usr/local >/dev/null
    make -j"$(nproc)" >/dev/null
    make install >/dev/null
  )
  hash -r
  fwup_ok || { echo "bootstrap: built fwup, but \`fwup --version\` does not report >= $FWUP_VERSION" >&2; exit 1; }
  echo "bootstrap: installed fwup $(fwup --version) at $(command -v fwup)" >&2
fi

# Python: a venv with exactly the locked packages (requirements-lock.txt: every package, with
# hashes; scripts/lock.sh moves it forward), then this checkout in it (editable, no dependencies,
# built by the locked setuptools). SSHFWUP_VENV / SSHFWUP_LOCK point elsewhere (scripts/lock.sh).
PY=${PYTHON:-python3}
venv=${SSHFWUP_VENV:-.venv}
lock=${SSHFWUP_LOCK:-requirements-lock.txt}
[ -f "$lock" ] || { echo "bootstrap: $lock: no such file" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp=$venv/.sshfwup-installed
want=$(cat "$lock" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_quiet() {  # pip's own chatter (this kind of machine's pip.conf, setuptools' editable notice) only on failure
    local out
    out=$("$venv/bin/python" -m pip "$@" 2>&1) || { echo "$out" >&2; return 1; }
  }
  echo "bootstrap: installing the locked Python packages into $venv" >&2
  pip_quiet install -q --disable-pip-version-check --require-hashes --no-deps -r "$lock"
  pip_quiet install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  # Exactly the lock: remove what an older lock installed and this one no longer names.
  extra=$("$venv/bin/python" scripts/lock_extras.py "$lock")
  if [ -n "$extra" ]; then
    echo "bootstrap: removing packages the lock does not name: $extra" >&2
    # shellcheck disable=SC2086
    pip_quiet uninstall -q -y $extra
  fi
  pip_quiet check
  "$venv/bin/python" -c "from sshfwup.dependency_warnings import silence; silence(); import asyncssh, anyio, pytest, pytest_asyncio"
  echo "$want" >"$stamp"
fi
