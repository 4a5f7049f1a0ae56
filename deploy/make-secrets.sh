#!/bin/sh
# Create the secret files compose.yaml reads, in ./secrets (or $1): a random hex password per
# Redis user, and empty placeholders for the Binance API key and secret (fill them in before
# `docker compose --profile user up`). Existing files are kept.
set -eu
dir="${1:-secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
for role in ingest_market ingest_user projector reader status admin; do
  f="$dir/redis_password_$role"
  [ -s "$f" ] || od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$f"
done
for f in binance_api_key binance_api_secret; do
  [ -e "$dir/$f" ] || : > "$dir/$f"
done
echo "secrets in $dir/: redis_password_* (generated), binance_api_key/secret (fill in)"
