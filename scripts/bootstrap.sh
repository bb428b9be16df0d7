#!/usr/bin/env bash
# Installs everything the demo, the tests and the benchmarks need. Idempotent; run as root on
# Debian 12 (the commands in README.md call it for you).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the real tools sshfwup drives (OpenSSH clients and, for the benchmarks, sshd;
# libubootenv's fw_printenv/fw_setenv; mksquashfs; mkfs.ext4; losetup/mount), load generators,
# and systemd-analyze for checking the unit file.
packages=(
  openssh-client openssh-server libubootenv-tool squashfs-tools e2fsprogs util-linux mount
  wrk hey systemd shellcheck python3-venv ca-certificates
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The loop driver must be there for the simulated device's slots.
if [ ! -e /dev/loop-control ]; then
  modprobe loop 2>/dev/null || true
fi

# Python: a project venv with the package and its test dependencies.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sshfwup-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import asyncssh, anyio, cryptography, pytest, pytest_asyncio" 
  touch "$stamp"
fi
