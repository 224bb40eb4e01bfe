#!/usr/bin/env bash
# Build (mmdebstrap) and import the local Debian 12 base image, once. The image alias
# $BASE_ALIAS carries property modelserve_base_key = hash of this recipe; an alias with the same
# key is reused, a tarball for the key under $CACHE_DIR is imported without rebuilding.
set -Eeuo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$here/common.sh"

INCLUDE=systemd-sysv,udev,dbus,cloud-init,ifupdown,isc-dhcp-client,netbase,sudo,locales,iproute2,python3,curl,ca-certificates,less
MIRROR="${MODELSERVE_DEBIAN_MIRROR:-http://deb.debian.org}"

base_key() {
  { cat "$here/build-base.sh"; echo "$INCLUDE $MIRROR"; cat "$here"/base-templates/*; } \
    | sha256sum | cut -c1-16
}

build_tarball() {
  local out=$1 work
  work="$(mktemp -d /var/tmp/modelserve-base.XXXXXX)"
  # shellcheck disable=SC2064  # expand $work now: it is local
  trap "rm -rf '$work'" RETURN
  log "mmdebstrap Debian 12 (bookworm) into $work/rootfs"
  retry 2 mmdebstrap --mode=root --variant=minbase --include="$INCLUDE" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$work/rootfs" \
    "deb $MIRROR/debian bookworm main" \
    "deb $MIRROR/debian bookworm-updates main" \
    "deb $MIRROR/debian-security bookworm-security main"
  local r=$work/rootfs
  install -m 0644 "$here/base-templates/interfaces" "$r/etc/network/interfaces"
  install -m 0644 "$here/base-templates/90_modelserve.cfg" "$r/etc/cloud/cloud.cfg.d/90_modelserve.cfg"
  : >"$r/etc/machine-id"
  rm -f "$r/var/lib/dbus/machine-id" "$r"/etc/ssh/ssh_host_*
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/log/*.log "$r"/var/log/apt/*
  mkdir -p "$work/templates"
  cp "$here"/base-templates/*.tpl "$work/templates/"
  sed -e "s/@CREATION_DATE@/$(date +%s)/" -e "s/@BASE_KEY@/$KEY/" \
    "$here/base-templates/metadata.yaml.in" >"$work/metadata.yaml"
  log "packing $out"
  mkdir -p "$(dirname "$out")"
  tar -C "$work" --numeric-owner --xattrs -cf - metadata.yaml templates rootfs \
    | zstd -q -T0 -3 -o "$out.tmp"
  mv "$out.tmp" "$out"
}

main() {
  local t0=$SECONDS tarball have
  KEY="$(base_key)"
  have="$(lxc image get-property "$BASE_ALIAS" modelserve_base_key 2>/dev/null || true)"
  if [[ "$have" == "$KEY" ]]; then
    return 0
  fi
  tarball="$CACHE_DIR/base-debian12-$KEY.tar.zst"
  if [[ ! -s "$tarball" ]]; then
    build_tarball "$tarball"
  else
    log "reusing cached $tarball"
  fi
  if [[ -n "$have" ]]; then
    log "base recipe changed ($have -> $KEY): replacing $BASE_ALIAS"
    lxc image delete "$BASE_ALIAS"
  fi
  log "importing $BASE_ALIAS"
  lxc image import "$tarball" --alias "$BASE_ALIAS" >/dev/null
  log "base image $BASE_ALIAS ready ($((SECONDS - t0)) s)"
}

main "$@"
