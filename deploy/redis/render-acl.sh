#!/bin/sh
# Render the ACL template into the file redis-server loads.
#
#   render-acl.sh TEMPLATE OUTPUT [ACCOUNT_TEMPLATE]
#
# Reads one password per role from $SECRETS_DIR (default /run/secrets), file
# redis_password_<role> (ingest_market, ingest_user, projector, reader, listener, status,
# admin), and writes its SHA-256 (never the password) into OUTPUT, with @PREFIX@ replaced by
# $PIPELINE_VIEW_PREFIX (default websocket). Then, for each account label of $PIPELINE_ACCOUNTS
# (comma list; `-`, the unlabelled account, has the users above), the users of
# ACCOUNT_TEMPLATE (default: account.acl.template next to TEMPLATE) with @ACCOUNT@ the label,
# from the secrets redis_password_ingest_user_<label> and redis_password_listener_<label>.
# Comment and blank lines are dropped: Redis ACL files have no comments. Exits 2 naming the
# missing secret, a bad prefix or a bad label.
set -eu
# no pathname expansion: an account label like `a*` must be refused, not matched against files
set -f
template="$1"
output="$2"
account_template="${3:-$(dirname "$template")/account.acl.template}"
secrets="${SECRETS_DIR:-/run/secrets}"
prefix="${PIPELINE_VIEW_PREFIX:-websocket}"
accounts="${PIPELINE_ACCOUNTS:-}"

case "$prefix" in
  ""|*[!A-Za-z0-9_.-]*)
    echo "render-acl: PIPELINE_VIEW_PREFIX '$prefix' must be a word of [A-Za-z0-9_.-]" >&2
    exit 2 ;;
esac

# the SHA-256 of the password in secret file $1 (a trailing newline is not part of it)
hash_of() {
  if [ ! -s "$1" ]; then
    echo "render-acl: missing or empty secret $1" >&2
    exit 2
  fi
  printf '%s' "$(cat "$1")" | sha256sum | cut -d' ' -f1
}

script="s/@PREFIX@/$prefix/g"
for role in ingest_market ingest_user projector reader listener status admin; do
  hash=$(hash_of "$secrets/redis_password_$role")
  upper=$(echo "$role" | tr 'a-z' 'A-Z')
  script="$script;s/@HASH_$upper@/$hash/g"
done

umask 077
trap 'rm -f "$output.tmp"' EXIT
grep -v -e '^#' -e '^[[:space:]]*$' "$template" | sed "$script" > "$output.tmp"
for label in $(echo "$accounts" | tr ',' ' '); do
  [ "$label" = "-" ] && continue
  # the labels PIPELINE_ACCOUNT allows (projections/core/keys.py ACCOUNT_LABEL)
  bad=""
  case "$label" in [!a-z0-9]*|*[!a-z0-9_-]*) bad=yes ;; esac
  if [ -n "$bad" ] || [ "${#label}" -gt 32 ]; then
    echo "render-acl: PIPELINE_ACCOUNTS label '$label' is not 1 to 32 of a-z 0-9 _ -," \
         "starting with a letter or digit" >&2
    exit 2
  fi
  ingest=$(hash_of "$secrets/redis_password_ingest_user_$label")
  listener=$(hash_of "$secrets/redis_password_listener_$label")
  grep -v -e '^#' -e '^[[:space:]]*$' "$account_template" | sed \
    "s/@ACCOUNT@/$label/g;s/@PREFIX@/$prefix/g;s/@HASH_INGEST_USER@/$ingest/g;s/@HASH_LISTENER@/$listener/g" \
    >> "$output.tmp"
done
# Redis Cluster (PIPELINE_REDIS_CLUSTER=1; docs/contract.md 5.13): every service user may read
# the slot map (CLUSTER SLOTS/SHARDS), the key positions of commands (COMMAND: redis-py asks
# once), INFO (cluster mode detected) and ASKING (a slot being
# migrated); the user ingestors WAIT for a replica; the projector appends to the depth book's
# tagged stream; the listeners run groups on the orders partitions; status reads each node's
# ROLE and DBSIZE. Load the same file on every node.
case "${PIPELINE_REDIS_CLUSTER:-}" in
  1|true|yes)
    groups='+xreadgroup +xack +xgroup|create +xautoclaim +xclaim +xpending +xinfo'
    sed -i \
      -e '/^user default /b' -e '/^user admin /b' \
      -e 's/$/ +cluster|slots +cluster|shards +info +asking +command/' \
      -e '/^user ingest-user/s/$/ +wait/' \
      -e '/^user projector /s/$/ (%W~raw:depth_snapshots:{diff} +xadd)/' \
      -e "s/^user listener .*\$/& (~$prefix:orders:{o[0-9]} $groups)/" \
      -e "s/^user listener-\([a-z0-9_-]*\) .*\$/& (~$prefix:acct:\\1:orders:{\\1.o[0-9]} $groups)/" \
      -e '/^user status /s/$/ +role +dbsize/' \
      "$output.tmp" ;;
esac
if grep -q '@[A-Z_]*@' "$output.tmp"; then
  echo "render-acl: unreplaced placeholder in $template" >&2
  exit 2
fi
mv "$output.tmp" "$output"
