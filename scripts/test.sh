#!/usr/bin/env bash
# Runs the test suite (installs what it needs first, fwup included). Extra arguments go to
# pytest, e.g.  ./scripts/test.sh -k sftp      ./scripts/test.sh --run-slow
# As root, or as a user with sudo (it re-runs itself with sudo: loop devices need root).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
  exec sudo --preserve-env=FWUP_SOURCE,PYTHON,CI,SSHFWUP_VENV,SSHFWUP_LOCK "$0" "$@"
fi
./scripts/bootstrap.sh
exec "${SSHFWUP_VENV:-.venv}/bin/python" -m pytest -q "$@"
