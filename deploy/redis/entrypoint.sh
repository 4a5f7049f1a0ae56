#!/bin/sh
# Entrypoint of the redis service (image redis:7): render the ACL file from the compose
# secrets, then hand over to the image's own entrypoint, which drops to the redis user.
#
# REDIS_APPENDFSYNC: everysec (default: at most ~1 s of writes lost on a power cut), always
# (every write fsynced: safest, slowest) or no (the OS decides).
set -eu
here=$(dirname "$0")
acl_dir=/run/redis-acl
mkdir -p "$acl_dir"
sh "$here/render-acl.sh" "$here/users.acl.template" "$acl_dir/users.acl"
chown -R redis:redis "$acl_dir" 2>/dev/null || true
fsync="${REDIS_APPENDFSYNC:-everysec}"
case "$fsync" in
  everysec|always|no) ;;
  *) echo "redis entrypoint: REDIS_APPENDFSYNC '$fsync' is not everysec, always or no" >&2
     exit 2 ;;
esac
exec docker-entrypoint.sh redis-server "$here/redis.conf" \
  --aclfile "$acl_dir/users.acl" --appendfsync "$fsync" "$@"
