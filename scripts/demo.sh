#!/usr/bin/env bash
# The main job on an embedded default: a simulated A/B device, the server, a v1→v2 hot update
# under load and a reboot-required update, with what happened printed as it happens.
# As root, or as a user with sudo (it re-runs itself with sudo: loop devices need root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  exec sudo --preserve-env=FWUP_SOURCE,PYTHON,SSHFWUP_VENV,SSHFWUP_LOCK "$0" "$@"
fi
./scripts/bootstrap.sh
exec "${SSHFWUP_VENV:-.venv}/bin/python" -m sshfwup.demo "$@"
