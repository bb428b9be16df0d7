#!/usr/bin/env bash
# The main job on an embedded default: a simulated A/B device, the server, a v1→v2 hot update
# under load and a reboot-required update, with what happened printed as it happens.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/python -m sshfwup.demo "$@"
