#!/usr/bin/env bash
# The main job: set-up, then the whole system on this machine (own Redis, the simulator,
# both ingestors, the projectors, a live terminal view). Extra arguments go to `pipeline demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pipeline demo "$@"
