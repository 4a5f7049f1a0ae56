#!/usr/bin/env bash
# Everything a fresh machine needs (Python 3.11 with pip; Debian packages reachable):
# redis-server from the system packages when it is missing, then a virtualenv in .venv with the
# project and its development tools installed at the versions in requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server from the system packages" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'
