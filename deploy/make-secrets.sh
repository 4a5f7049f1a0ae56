#!/bin/sh
# Create the secret files compose.yaml reads, in ./secrets (or $1). Existing files are kept.
#
# - redis_password_<role>: a random hex password per Redis user (deploy/redis/users.acl.template);
# - grafana_admin_password: a random hex password for Grafana's `admin` (profile observability);
# - binance_api_key, binance_api_secret: empty placeholders (fill them in before
#   `docker compose --profile user up`);
# - for each account label of $PIPELINE_ACCOUNTS (`-` aside): redis_password_ingest_user_<label>
#   and redis_password_listener_<label> (its ACL users, deploy/redis/account.acl.template), and
#   empty binance_api_key_<label>, binance_api_secret_<label>;
# - for the TLS profile (deploy/compose.tls.yaml), made with openssl: redis_tls_ca, the
#   certificate of a CA made for this deployment alone; redis_tls_cert and redis_tls_key, the
#   Redis server's certificate signed by it, for the names clients use: redis (the compose
#   service), localhost, 127.0.0.1 (REDIS_TLS_SAN replaces the list: "DNS:redis,DNS:x.lan").
#   The CA's key (redis_tls_ca_key) stays here and is mounted nowhere: it is only needed to
#   sign the next server certificate (delete redis_tls_cert and run this again).
set -eu
dir="${1:-secrets}"
mkdir -p "$dir"
chmod 700 "$dir"
umask 077
for role in ingest_market ingest_user projector reader listener status admin; do
  f="$dir/redis_password_$role"
  [ -s "$f" ] || od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$f"
done
# the Grafana admin's password (compose profile `observability`)
[ -s "$dir/grafana_admin_password" ] || od -An -N24 -tx1 /dev/urandom | tr -d ' \n' \
  > "$dir/grafana_admin_password"
for f in binance_api_key binance_api_secret; do
  [ -e "$dir/$f" ] || : > "$dir/$f"
done
for label in $(echo "${PIPELINE_ACCOUNTS:-}" | tr ',' ' '); do
  case "$label" in -|*/*|.*) continue ;; esac
  for f in "redis_password_ingest_user_$label" "redis_password_listener_$label"; do
    [ -s "$dir/$f" ] || od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$f"
  done
  for f in "binance_api_key_$label" "binance_api_secret_$label"; do
    [ -e "$dir/$f" ] || : > "$dir/$f"
  done
done

make_tls() {
  conf="$dir/.openssl.cnf"
  # a config of our own, so the certificates do not depend on the system's openssl.cnf
  cat > "$conf" <<EOF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = crypto-data-redis CA
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = ${REDIS_TLS_SAN:-DNS:redis,DNS:localhost,IP:127.0.0.1}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  if [ ! -s "$dir/redis_tls_ca" ] || [ ! -s "$dir/redis_tls_ca_key" ]; then
    openssl req -x509 -config "$conf" -extensions ca -newkey rsa:3072 -nodes -days 3650 \
      -keyout "$dir/redis_tls_ca_key" -out "$dir/redis_tls_ca" 2>/dev/null
  fi
  openssl req -new -config "$conf" -subj "/CN=redis" -newkey rsa:2048 -nodes \
    -keyout "$dir/redis_tls_key" -out "$dir/.server.csr" 2>/dev/null
  serial="0x$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  openssl x509 -req -in "$dir/.server.csr" -CA "$dir/redis_tls_ca" \
    -CAkey "$dir/redis_tls_ca_key" -set_serial "$serial" -days 825 \
    -extfile "$conf" -extensions server -out "$dir/redis_tls_cert" 2>/dev/null
  rm -f "$dir/.server.csr" "$conf"
  # certificates are public; the keys stay readable by their owner only
  chmod 644 "$dir/redis_tls_ca" "$dir/redis_tls_cert"
}

if [ -s "$dir/redis_tls_cert" ] && [ -s "$dir/redis_tls_key" ]; then
  :
elif command -v openssl >/dev/null 2>&1; then
  make_tls
else
  echo "make-secrets: openssl not found: no TLS certificates (for deploy/compose.tls.yaml)" >&2
fi
echo "secrets in $dir/: redis_password_*, grafana_admin_password (generated)," \
     "binance_api_key/secret (fill in), redis_tls_* (the TLS profile)"
