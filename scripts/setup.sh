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

# prometheus and promtool: the alerting rules' unit tests (`promtool test rules`) and the test
# that runs a real Prometheus against the pipeline (tests/test_alerts.py). The tests start
# their own prometheus on a free port with a temporary data folder, so the package's service
# must not start: a policy-rc.d that refuses it (Debian's own switch) is put in place for the
# install, unless the machine has one already (containers usually do).
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "setup: installing prometheus (and promtool) from the system packages" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  policy=/usr/sbin/policy-rc.d
  made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    made_policy=yes
  fi
  $SUDO apt-get update -qq
  status=0
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null || status=$?
  [ -n "$made_policy" ] && $SUDO rm -f "$policy"
  [ "$status" -eq 0 ] || exit "$status"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e '.[dev]'

# The Compose Specification's JSON schema, which tests/test_compose_schema.py validates
# compose.yaml against. It is not committed: it is read out of a PyPI wheel that ships the
# compose-spec project's own compose-spec.json (check-jsonschema vendors it for its
# check-compose-spec hook), pinned by version and hash, once, into .cache/ (git-ignored).
# Kept while its hash matches; a newer schema means new pins here.
SCHEMA_WHEEL="check-jsonschema==0.39.0"
SCHEMA_WHEEL_SHA256=14ce5c94871c551268ea948ffe21e9f1464dc48fb20bf9a4c13deeaaf756cf9b
SCHEMA_SHA256=d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64
SCHEMA_DIR=.cache/compose-spec
if ! echo "$SCHEMA_SHA256  $SCHEMA_DIR/compose-spec.json" | sha256sum -c --status 2>/dev/null; then
  echo "setup: fetching the Compose Specification schema ($SCHEMA_WHEEL from PyPI)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "$SCHEMA_WHEEL --hash=sha256:$SCHEMA_WHEEL_SHA256" > "$tmp/wheel.txt"
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes -r "$tmp/wheel.txt" -d "$tmp" 2> "$tmp/pip.log" \
    || { cat "$tmp/pip.log" >&2; exit 1; }
  mkdir -p "$SCHEMA_DIR"
  .venv/bin/python - "$tmp" "$SCHEMA_DIR" <<'PY'
import pathlib, sys, zipfile

tmp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
[wheel] = tmp.glob("check_jsonschema-*.whl")
vendor = "check_jsonschema/builtin_schemas/vendor/"
with zipfile.ZipFile(wheel) as z:
    (out / "LICENSE").write_bytes(z.read(vendor + "licenses/LICENSE.compose-spec"))
    (out / "compose-spec.json.tmp").write_bytes(z.read(vendor + "compose-spec.json"))
PY
  echo "$SCHEMA_SHA256  $SCHEMA_DIR/compose-spec.json.tmp" | sha256sum -c --status \
    || { echo "setup: the compose-spec.json in $SCHEMA_WHEEL is not the pinned one" >&2; exit 1; }
  mv "$SCHEMA_DIR/compose-spec.json.tmp" "$SCHEMA_DIR/compose-spec.json"
fi
