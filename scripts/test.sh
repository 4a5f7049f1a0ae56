#!/usr/bin/env bash
# The test command: set-up, then lint (ruff with the ASYNC rules), types (mypy), tests (pytest,
# warnings are errors). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
