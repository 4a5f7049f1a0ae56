#!/bin/sh
# Render the ACL template into the file redis-server loads.
#
#   render-acl.sh TEMPLATE OUTPUT
#
# Reads one password per role from $SECRETS_DIR (default /run/secrets), file
# redis_password_<role> (ingest_market, ingest_user, projector, reader, listener, status,
# admin), and writes its SHA-256 (never the password) into OUTPUT, with @PREFIX@ replaced by
# $PIPELINE_VIEW_PREFIX (default websocket). Comment and blank lines are dropped: Redis ACL
# files have no comments. Exits 2 naming the missing secret or a bad prefix.
set -eu
template="$1"
output="$2"
secrets="${SECRETS_DIR:-/run/secrets}"
prefix="${PIPELINE_VIEW_PREFIX:-websocket}"

case "$prefix" in
  ""|*[!A-Za-z0-9_.-]*)
    echo "render-acl: PIPELINE_VIEW_PREFIX '$prefix' must be a word of [A-Za-z0-9_.-]" >&2
    exit 2 ;;
esac

script="s/@PREFIX@/$prefix/g"
for role in ingest_market ingest_user projector reader listener status admin; do
  file="$secrets/redis_password_$role"
  if [ ! -s "$file" ]; then
    echo "render-acl: missing or empty secret $file" >&2
    exit 2
  fi
  # a trailing newline in the secret file is not part of the password
  hash=$(printf '%s' "$(cat "$file")" | sha256sum | cut -d' ' -f1)
  upper=$(echo "$role" | tr 'a-z' 'A-Z')
  script="$script;s/@HASH_$upper@/$hash/g"
done

umask 077
grep -v -e '^#' -e '^[[:space:]]*$' "$template" | sed "$script" > "$output.tmp"
if grep -q '@[A-Z_]*@' "$output.tmp"; then
  echo "render-acl: unreplaced placeholder in $template" >&2
  rm -f "$output.tmp"
  exit 2
fi
mv "$output.tmp" "$output"
