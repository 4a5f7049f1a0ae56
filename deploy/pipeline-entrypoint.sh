#!/bin/sh
# Entrypoint of the pipeline image: build REDIS_URL from the role's Redis user and a password
# read from a compose secret, then run the command (`pipeline <role> ...`).
#
#   REDIS_USER           the ACL user of this role (ingest-market, ingest-user, projector, ...)
#   REDIS_PASSWORD_FILE  a file holding its password (a compose secret)
#   REDIS_ADDRESS        host:port of Redis (default redis:6379), REDIS_DB (default 0)
#   REDIS_SCHEME         redis (default) or rediss (TLS: deploy/compose.tls.yaml)
#   REDIS_CA_FILE        with rediss: the CA certificate the server's certificate must chain to
#                        (a compose secret); without it, the system's CAs
#
# When REDIS_URL is already set, it is used unchanged. The password must be URL-safe
# (letters, digits, . _ ~ -; deploy/make-secrets.sh makes hex ones), so that it can stand in
# the URL without encoding; the entrypoint refuses any other and exits 2 without printing it.
set -eu
if [ -z "${REDIS_URL:-}" ] && [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
  if [ ! -s "$REDIS_PASSWORD_FILE" ]; then
    echo "pipeline: bad setting REDIS_PASSWORD_FILE: $REDIS_PASSWORD_FILE is missing or empty" >&2
    exit 2
  fi
  password=$(cat "$REDIS_PASSWORD_FILE")
  case "$password" in
    *[!A-Za-z0-9._~-]*)
      echo "pipeline: bad setting REDIS_PASSWORD_FILE: the password must be URL-safe" >&2
      exit 2 ;;
  esac
  scheme="${REDIS_SCHEME:-redis}"
  query=""
  case "$scheme" in
    redis) ;;
    rediss)
      if [ -n "${REDIS_CA_FILE:-}" ]; then
        if [ ! -s "$REDIS_CA_FILE" ]; then
          echo "pipeline: bad setting REDIS_CA_FILE: $REDIS_CA_FILE is missing or empty" >&2
          exit 2
        fi
        case "$REDIS_CA_FILE" in
          *[!A-Za-z0-9._/~-]*)
            echo "pipeline: bad setting REDIS_CA_FILE: the path must be URL-safe" >&2
            exit 2 ;;
        esac
        query="?ssl_ca_certs=$REDIS_CA_FILE"
      fi ;;
    *) echo "pipeline: bad setting REDIS_SCHEME: '$scheme' is not redis or rediss" >&2
       exit 2 ;;
  esac
  REDIS_URL="${scheme}://${REDIS_USER:?REDIS_USER is required}:${password}@${REDIS_ADDRESS:-redis:6379}/${REDIS_DB:-0}${query}"
  export REDIS_URL
  unset password scheme query
fi
exec "$@"
