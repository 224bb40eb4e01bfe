#!/usr/bin/env bash
# The distribution's updates, security ones included, at bake time. The dependencies layer is
# keyed by the ISO week (packer/bake.py security_week), so a layer from an earlier week is baked
# again with that week's updates; /etc/modelserve/os-updates records what was applied.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants deps || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
export DEBIAN_FRONTEND=noninteractive
# no daemon restarts while upgrading a build container
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
retry 3 apt-get update -q
pending=$(apt-get -s upgrade | grep -c '^Inst ' || true)
retry 3 apt-get upgrade -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
rm -f /usr/sbin/policy-rc.d
left=$(apt-get -s upgrade | grep -c '^Inst ' || true)
[[ "$left" == 0 ]] || die "$left packages still upgradable after apt-get upgrade"
install -d -m 0755 /etc/modelserve
printf 'security_week=%s\nupgraded=%s\nsources=%s\n' "${MODELSERVE_SECURITY_WEEK:-unknown}" \
  "$pending" "$(grep -rhoE '^(URIs|Suites):.*|^deb .*' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | tr '\n' ' ')" >/etc/modelserve/os-updates
chmod 0644 /etc/modelserve/os-updates
log::info "distribution updates of ${MODELSERVE_SECURITY_WEEK:-unknown}: $pending packages upgraded, 0 left"
