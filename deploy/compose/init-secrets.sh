#!/bin/sh
# The compose demo's one-time setup (the `lepton-init` service): the mesh CA,
# the admin token key, one join token per service and an admin CLI config.
# Idempotent: what already exists is kept, tokens are re-issued on each run.
#
#   CA_DIR    the operator's secrets: the CA directory, the token key, the
#             admin token (mounted by the control daemons only)
#   JOIN_DIR  what sidecars get: the trust bundle and their join tokens
#   OWNER     uid:gid the files are handed to (the image's user); empty: keep
set -eu

CA_DIR=${CA_DIR:-/var/lib/lepton/ca}
JOIN_DIR=${JOIN_DIR:-/var/lib/lepton/join}
OWNER=${OWNER-10001:10001}
TRUST_DOMAIN=${TRUST_DOMAIN:-cluster.local}
SERVICES=${SERVICES:-chat intent dialog}
ADMIN_SERVER=${ADMIN_SERVER:-http://control-a:15011}

umask 077
mkdir -p "$CA_DIR" "$JOIN_DIR"

if [ ! -f "$CA_DIR/certs/ca-cert.pem" ]; then
    lepton-mesh certs init --dir "$CA_DIR/certs" --trust-domain "$TRUST_DOMAIN"
fi
if [ ! -f "$CA_DIR/token.key" ]; then
    lepton-mesh token init-key "$CA_DIR/token.key"
fi

# Sidecars verify the control daemon against the bundle before sending their
# token; it is public, the tokens are not.
cp "$CA_DIR/certs/bundle.pem" "$JOIN_DIR/bundle.pem"
for service in $SERVICES; do
    # A sidecar bootstraps again on every start (its key is never written),
    # so its join token must outlive the demo: a year.
    lepton-mesh token create --role join --service "$service" --namespace default \
        --token-key "$CA_DIR/token.key" --ttl 8760h > "$JOIN_DIR/$service.token.new"
    mv "$JOIN_DIR/$service.token.new" "$JOIN_DIR/$service.token"
done

# The CLI in any container with CA_DIR mounted: LEPTON_CONFIG=$CA_DIR/cli.json.
admin_token=$(lepton-mesh token create --role admin --subject compose-admin \
    --token-key "$CA_DIR/token.key" --ttl 720h)
LEPTON_CONFIG="$CA_DIR/cli.json" lepton-mesh login --no-verify \
    --server "$ADMIN_SERVER" --token "$admin_token" > /dev/null

if [ -n "$OWNER" ]; then
    chown -R "$OWNER" "$CA_DIR" "$JOIN_DIR"
fi
echo "lepton-init: CA in $CA_DIR/certs, join tokens for: $SERVICES"
