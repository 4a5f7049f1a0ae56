#!/bin/sh
# Entrypoint of the redis service (image redis:7.0): render the ACL file from the compose
# secrets, then hand over to the image's own entrypoint, which drops to the redis user.
#
# REDIS_APPENDFSYNC: everysec (default: at most ~1 s of writes lost on a power cut), always
# (every write fsynced: safest, slowest) or no (the OS decides).
# REDIS_TLS: no (default) or yes: TLS only, on port 6379, no plaintext port, with the secrets
# redis_tls_cert, redis_tls_key, redis_tls_ca (made by deploy/make-secrets.sh; used by
# deploy/compose.tls.yaml). Clients authenticate with their ACL password as without TLS; the
# certificate lets them check they talk to this server.
# REDIS_CLUSTER: no (default) or yes: a Redis Cluster node (deploy/compose.cluster.yaml; its
# slot map in /data/nodes.conf), with the ACL's cluster additions (render-acl.sh). Every node
# renders the same ACL from the same secrets.
# SECRETS_DIR (/run/secrets), REDIS_RUN_DIR (/run/redis-acl, where the rendered ACL and the
# TLS files readable by the redis user go) and REDIS_DATA_DIR (/data, the volume) are for
# running this outside the image.
set -eu
here=$(dirname "$0")
secrets="${SECRETS_DIR:-/run/secrets}"
run_dir="${REDIS_RUN_DIR:-/run/redis-acl}"
mkdir -p "$run_dir"
cluster="${REDIS_CLUSTER:-no}"
case "$cluster" in
  no) ;;
  yes) export PIPELINE_REDIS_CLUSTER=1 ;;
  *) echo "redis entrypoint: REDIS_CLUSTER '$cluster' is not yes or no" >&2
     exit 2 ;;
esac
# PIPELINE_ACCOUNTS (a comma list of account labels) adds the users of each account
sh "$here/render-acl.sh" "$here/users.acl.template" "$run_dir/users.acl" \
  "$here/account.acl.template"
fsync="${REDIS_APPENDFSYNC:-everysec}"
case "$fsync" in
  everysec|always|no) ;;
  *) echo "redis entrypoint: REDIS_APPENDFSYNC '$fsync' is not everysec, always or no" >&2
     exit 2 ;;
esac
case "${REDIS_TLS:-no}" in
  no) ;;
  yes)
    for f in redis_tls_cert redis_tls_key redis_tls_ca; do
      if [ ! -s "$secrets/$f" ]; then
        echo "redis entrypoint: REDIS_TLS=yes needs the secret $secrets/$f" >&2
        exit 2
      fi
    done
    # compose mounts secrets with the host's owner and mode; redis-server runs as the redis
    # user and must read its key, so it gets a copy only that user can read
    (umask 077 && cp "$secrets/redis_tls_key" "$run_dir/tls.key")
    cp "$secrets/redis_tls_cert" "$run_dir/tls.crt"
    cp "$secrets/redis_tls_ca" "$run_dir/ca.crt"
    set -- --port 0 --tls-port 6379 --tls-cert-file "$run_dir/tls.crt" \
      --tls-key-file "$run_dir/tls.key" --tls-ca-cert-file "$run_dir/ca.crt" \
      --tls-auth-clients no "$@" ;;
  *) echo "redis entrypoint: REDIS_TLS '${REDIS_TLS}' is not yes or no" >&2
     exit 2 ;;
esac
if [ "$cluster" = yes ]; then
  # a replica is promoted once its master has been unreachable for the node timeout; clients
  # are sent the node's host name (the compose service's), which survives a new container IP
  set -- --cluster-enabled yes --cluster-config-file nodes.conf \
    --cluster-node-timeout "${REDIS_CLUSTER_NODE_TIMEOUT_MS:-5000}" \
    --cluster-announce-hostname "$(hostname)" \
    --cluster-preferred-endpoint-type hostname "$@"
fi
chown -R redis:redis "$run_dir" 2>/dev/null || true
exec docker-entrypoint.sh redis-server "$here/redis.conf" --dir "${REDIS_DATA_DIR:-/data}" \
  --aclfile "$run_dir/users.acl" --appendfsync "$fsync" "$@"
