#!/usr/bin/env bash
# systemd units: modelserve-firstboot (instance config -> RabbitMQ/Redis config, before anything
# starts), modelserve-web, modelserve-worker, and drop-ins tying RabbitMQ/Redis to firstboot and
# to the instance's role. Enabled, never started here.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants release || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
units=/etc/systemd/system
install -d -m 0755 "$MODELSERVE_PREFIX/bin" /etc/modelserve
install -m 0755 "$FILES_DIR/modelserve-firstboot" "$MODELSERVE_PREFIX/bin/modelserve-firstboot"
install -m 0755 "$FILES_DIR/modelserve-role-is" "$MODELSERVE_PREFIX/bin/modelserve-role-is"
for unit in modelserve-firstboot.service modelserve-web.service modelserve-worker.service; do
  install -m 0644 "$FILES_DIR/$unit" "$units/$unit"
done
for svc in rabbitmq-server redis-server epmd; do
  [[ -f "$FILES_DIR/$svc.conf" ]] || continue
  install -d -m 0755 "$units/$svc.service.d"
  install -m 0644 "$FILES_DIR/$svc.conf" "$units/$svc.service.d/10-modelserve.conf"
done
if [[ -f /lib/systemd/system/epmd.socket ]]; then
  install -d -m 0755 "$units/epmd.socket.d"
  install -m 0644 "$FILES_DIR/epmd.socket.conf" "$units/epmd.socket.d/10-modelserve.conf"
fi
systemctl daemon-reload
systemctl enable modelserve-firstboot.service modelserve-web.service modelserve-worker.service \
  >/dev/null 2>&1
for unit in modelserve-firstboot.service modelserve-web.service modelserve-worker.service; do
  systemctl is-enabled --quiet "$unit" || die "$unit is not enabled"
done
log::info "units installed and enabled"
