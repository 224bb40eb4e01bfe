#!/usr/bin/env bash
# RabbitMQ (the Celery broker), Redis (the result backend) and nftables (the broker firewall),
# enabled but unconfigured: no
# account is baked (guest never survives into the image); modelserve-firstboot writes the
# instance's user, vhost, password and bind address from /etc/modelserve/instance.env.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants deps || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
# nftables: modelserve-firstboot's broker firewall (only the release's workers reach 5671/6380)
pkgs=(rabbitmq-server redis-server nftables)
if pkg::installed "${pkgs[@]}"; then
  log::info "already installed: ${pkgs[*]}"
else
  # Do not let the postinst start the daemons: a started RabbitMQ creates guest and a cookie.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  apt::install "${pkgs[@]}"
  rm -f /usr/sbin/policy-rc.d
fi

# Loopback-only Erlang distribution and epmd; AMQP listeners come from firstboot's conf.
install -d -m 0755 /etc/rabbitmq
cat >/etc/rabbitmq/rabbitmq-env.conf <<'CONF'
# modelserve: Erlang distribution and epmd on loopback only (the AMQP listener is set per
# instance by modelserve-firstboot in rabbitmq.conf).
NODENAME=rabbit@localhost
ERL_EPMD_ADDRESS=127.0.0.1
SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
CONF
chmod 0644 /etc/rabbitmq/rabbitmq-env.conf

# Redis reads the per-instance part (password, bind) from a file firstboot writes.
grep -qxF 'include /etc/redis/modelserve.conf' /etc/redis/redis.conf \
  || printf '\n# modelserve: per-instance settings written at boot\ninclude /etc/redis/modelserve.conf\n' \
    >>/etc/redis/redis.conf
if [[ ! -e /etc/redis/modelserve.conf ]]; then
  install -m 0640 -o root -g redis /dev/null /etc/redis/modelserve.conf
fi

systemctl enable rabbitmq-server.service redis-server.service >/dev/null 2>&1
# Debian's nftables.service would load /etc/nftables.conf ("flush ruleset"): firstboot owns
# the ruleset
systemctl disable nftables.service >/dev/null 2>&1 || true
log::info "rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server), redis-server $(dpkg-query -W -f='${Version}' redis-server)"
