#!/usr/bin/env bash
# Hardening: the non-root service user owns nothing it runs; config dirs are closed; sshd (on
# images that have it) does not start; only the app port listens on all interfaces (RabbitMQ,
# Redis and epmd are loopback-only unless the instance's role opens the broker).
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants release || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
id "$MODELSERVE_USER" >/dev/null || die "service user $MODELSERVE_USER missing"
[[ "$(id -u "$MODELSERVE_USER")" -ne 0 ]] || die "service user must not be root"
chown root:root "$MODELSERVE_PREFIX"
chmod 0755 "$MODELSERVE_PREFIX"
chown root:"$MODELSERVE_USER" /etc/modelserve
chmod 0750 /etc/modelserve
# nothing under the prefix may be writable by the service user or others
if bad="$(find "$MODELSERVE_PREFIX" ! -type l \( -perm -o+w -o -perm -g+w -o ! -user root \) \
  -print -quit)" \
  && [[ -n "$bad" ]]; then
  die "writable or foreign-owned file in the image: $bad"
fi
# the service account cannot log in
usermod --lock --shell /usr/sbin/nologin "$MODELSERVE_USER"
if [[ "${MODELSERVE_KEEP_SSH:-false}" != true ]]; then
  for unit in ssh.service ssh.socket; do
    if systemctl cat "$unit" >/dev/null 2>&1; then
      systemctl disable "$unit" >/dev/null 2>&1 || true
      systemctl mask "$unit" >/dev/null 2>&1
      log::info "disabled $unit (immutable instances are not logged into)"
    fi
  done
fi
# Redis: loopback unless firstboot opens it; no protected-mode surprises
sed -i -E 's/^bind .*/bind 127.0.0.1 -::1/' /etc/redis/redis.conf
log::info "hardened"
