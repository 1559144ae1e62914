#!/bin/sh
# A private CA and one server certificate for the main host's Redis, PostgreSQL and
# MinIO (deploy/expose.compose.yml; README "Adding a GPU host").
#
#   deploy/make-certs.sh main.example.org 10.0.0.5 [more names or IPs...]
#
# Writes into $TLS_DIR (default: deploy/tls next to this script):
#   ca.crt       copy it to every worker host (deploy/tls/ca.crt there)
#   ca.key       keep it here (or offline): it signs certificates
#   server.crt   valid for the names given plus redis, postgres, minio, localhost, 127.0.0.1
#   server.key   then: sudo chown 999:999 server.key (the redis and postgres users of
#                their images; MinIO runs as root) - PostgreSQL refuses a key others can read
# An existing CA is reused, so worker hosts keep trusting a renewed server certificate.
set -eu

if [ "$#" -lt 1 ]; then
    echo "usage: $0 HOSTNAME-OR-IP [MORE...]" >&2
    exit 2
fi
dir=${TLS_DIR:-$(dirname "$0")/tls}
days=${TLS_DAYS:-825}
mkdir -p "$dir"
umask 077

san="DNS:redis,DNS:postgres,DNS:minio,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    case "$name" in
        *[!0-9.]*) case "$name" in *:*) san="$san,IP:$name" ;; *) san="$san,DNS:$name" ;; esac ;;
        *) san="$san,IP:$name" ;;
    esac
done

if [ ! -f "$dir/ca.key" ]; then
    openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=Trainyard private CA" \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
fi
openssl req -newkey rsa:3072 -nodes -subj "/CN=$1" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -days "$days" -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext"
chmod 644 "$dir/ca.crt" "$dir/server.crt"
chmod 600 "$dir/ca.key" "$dir/server.key"
echo "$dir/server.crt: $san"
echo "next: sudo chown 999:999 $dir/server.key; copy $dir/ca.crt to each worker host"
