#!/usr/bin/env bash
# Runs the test suite (installs what it needs first). Extra arguments go to pytest, e.g.
#   ./scripts/test.sh -k sftp        ./scripts/test.sh --real-fwup
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
