#!/usr/bin/env bash
# Trust the extra CA certificates given for this bake (corporate or intercepting proxies), so
# apt/pip over HTTPS work. cleanup.sh removes them again: the image never trusts them.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

boot::wait
pem="$INPUTS_DIR/extra-ca.pem"
if [[ ! -s "$pem" ]]; then
  log::info "no extra CA certificates for this bake"
  exit 0
fi
command -v update-ca-certificates >/dev/null || apt::install ca-certificates
install -d -m 0755 /usr/local/share/ca-certificates
# one certificate per file: update-ca-certificates reads the first one of each file only
awk -v dir=/usr/local/share/ca-certificates '
  /-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("%s/modelserve-build-%02d.crt", dir, n) }
  f { print > f }
  /-----END CERTIFICATE-----/ { close(f); f = "" }' "$pem"
update-ca-certificates >/dev/null
log::info "trusting $(grep -c 'BEGIN CERTIFICATE' "$pem") extra CA certificate(s) during the bake"
