#!/usr/bin/env bash
# Leave nothing of the bake in the image: build CA certificates, apt lists and caches, pip
# caches, logs, shell history, SSH host keys, the machine id, cloud-init state, RabbitMQ's node
# database and Erlang cookie, Redis dumps, and the build inputs.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

for svc in modelserve-web modelserve-worker rabbitmq-server redis-server epmd.socket epmd; do
  systemctl stop "$svc" >/dev/null 2>&1 || true
done
pkill -u rabbitmq >/dev/null 2>&1 || true

if compgen -G '/usr/local/share/ca-certificates/modelserve-build-*' >/dev/null; then
  rm -f /usr/local/share/ca-certificates/modelserve-build-*
  update-ca-certificates --fresh >/dev/null
  log::info "removed the bake's extra CA certificates"
fi

apt-get -y -q autoremove --purge >/dev/null
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old
rm -rf /root/.cache /root/.wget-hsts /root/.lesshst /var/lib/modelserve/.cache
find / -xdev \( -name .bash_history -o -name .python_history -o -name .viminfo \) -type f \
  -delete 2>/dev/null || true
rm -f /etc/ssh/ssh_host_*
rm -rf /var/lib/rabbitmq/mnesia /var/lib/rabbitmq/.erlang.cookie /var/lib/redis/*.rdb
rm -f /etc/modelserve/instance.env /etc/redis/modelserve.conf.tmp
if [[ -f /etc/redis/modelserve.conf ]]; then : >/etc/redis/modelserve.conf; fi
rm -f /etc/rabbitmq/rabbitmq.conf

if command -v cloud-init >/dev/null; then
  cloud-init clean --logs >/dev/null
fi
# Nor the build server's config drive (Nova's NoCloud seed on the OpenStack harness's LXD host)
# or login key (Packer's temporary keypair): each instance gets its own at first boot.
rm -rf /var/lib/cloud/seed/nocloud
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' -o -name '*.old' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /var/log/journal/* /var/tmp/* "$BUILD_DIR"
find /tmp -mindepth 1 -maxdepth 1 -exec rm -rf {} +
sync
log::info "clean (layer $MODELSERVE_LAYER)"
