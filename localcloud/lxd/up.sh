#!/usr/bin/env bash
# Make the local LXD cloud usable, idempotently: packages, daemon, storage pool, NATed bridge,
# the default profile, and the Debian 12 base image. Fast (a few lxc calls) when all is up.
# Copes with what a SIGKILLed daemon leaves behind (stale socket, bridge, nft table, pid files).
#
# Environment:
#   MODELSERVE_LXD_BRIDGE   managed bridge name            (default msbr0)
#   MODELSERVE_LXD_SUBNET   bridge address/prefix          (default 10.87.42.1/24)
#   MODELSERVE_LXD_POOL     storage pool (dir driver)      (default default)
#   MODELSERVE_LXD_COW_POOL copy-on-write pool for releases (default modelserve-cow): a
#                           loop-backed btrfs pool, where the kernel and loop devices allow
#   MODELSERVE_LXD_COW=0    do not create it (instances stay on the dir pool)
#   MODELSERVE_LXD_COW_SIZE its loop file's (sparse) size (default 40GiB)
#   MODELSERVE_SKIP_BASE=1  do not build/import the base image
# Usage: up.sh [--packages-only]   (--packages-only: just the host tools, e.g. for lint/tests)
set -Eeuo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/common.sh
source "$here/common.sh"

BRIDGE="${MODELSERVE_LXD_BRIDGE:-msbr0}"
SUBNET="${MODELSERVE_LXD_SUBNET:-10.87.42.1/24}"
POOL="${MODELSERVE_LXD_POOL:-default}"
COW_POOL="${MODELSERVE_LXD_COW_POOL:-modelserve-cow}"
# LXD_DIR (honoured by lxd and lxc) lets tests run a private daemon beside the shared one.
LXD_SOCKET="${LXD_DIR:-/var/lib/lxd}/unix.socket"
if [[ -n "${LXD_DIR:-}" ]]; then LXD_LOG_DIR="$LXD_DIR/logs"; else LXD_LOG_DIR=/var/log/lxd; fi
LOCK="/run/lock/modelserve-local-cloud$(echo "${LXD_DIR:-}" | tr / _).v2.lock"

ensure_packages() {
  local missing=() cmd pkg
  for cmd in lxd:lxd lxc:lxd-client mmdebstrap:mmdebstrap nft:nftables dnsmasq:dnsmasq-base \
             zstd:zstd curl:curl packer:packer shellcheck:shellcheck mkfs.btrfs:btrfs-progs; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || missing+=("${cmd#*:}")
  done
  # the wheelhouse is downloaded with Debian's own python3 (the image's Python version)
  /usr/bin/python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    retry 3 apt-get update -q
    retry 3 apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  for pkg in lxd lxc mmdebstrap nft dnsmasq zstd curl; do
    command -v "$pkg" >/dev/null || die "$pkg is still missing after apt-get install"
  done
}

lxd_answers() { timeout 15 lxc query /1.0 >/dev/null 2>&1; }

# 0: someone listens on the daemon's socket; 1: nobody does (absent, or stale after a SIGKILL)
socket_listened() {
  [[ -S "$LXD_SOCKET" ]] || return 1
  local rc=0
  timeout 10 curl -s -o /dev/null --unix-socket "$LXD_SOCKET" http://lxd/1.0 || rc=$?
  [[ $rc -ne 7 ]]  # 7 = connection refused; a timeout means a busy but live daemon
}

# The pid of the process listening on the daemon's socket (for a wedged daemon), or nothing.
socket_owner() {
  ss -xlpn 2>/dev/null | awk -v s="$LXD_SOCKET" '$5 == s' | grep -o 'pid=[0-9]*' | head -1 \
    | cut -d= -f2
}

ensure_daemon() {
  lxd_answers && return 0
  if socket_listened; then
    log "the LXD daemon answers slowly; waiting up to 90 s for it"
    local i pid
    for ((i = 0; i < 6; i++)); do lxd_answers && return 0; done
    # Seen once under load: every API call, even GET /, hung for minutes. Restarting the
    # daemon is safe for instances (their monitors keep running and are re-attached).
    pid="$(socket_owner)"
    [[ -n "$pid" ]] || die "LXD does not answer and no process owns $LXD_SOCKET"
    log "LXD daemon (pid $pid) is wedged: restarting it; instances keep running"
    kill -9 "$pid"
    sleep 1
  fi
  if ! lxd_answers; then
    log "starting the LXD daemon (no systemd here)"
    mkdir -p "$LXD_LOG_DIR"
    # A SIGKILLed daemon leaves its socket behind; nobody listens on it any more.
    rm -f "$LXD_SOCKET"
    # 9>&-: the daemon must not inherit (and so hold forever) our set-up lock.
    setsid lxd --group root --logfile "$LXD_LOG_DIR/lxd.log" 9>&- \
      </dev/null >>"$LXD_LOG_DIR/lxd.stdout" 2>&1 &
  fi
  timeout 120 lxd waitready --timeout=110 \
    || die "LXD did not become ready in 120 s; see $LXD_LOG_DIR/lxd.log"
  lxd_answers || die "LXD is running but 'lxc query /1.0' fails; see $LXD_LOG_DIR/lxd.log"
}

check_subnet() {
  local net="${SUBNET%.*}."   # crude /24 prefix match, enough for the clash check
  if ip -4 route show | grep -v " dev $BRIDGE " | grep -qF "$net"; then
    die "subnet $SUBNET clashes with a host route; set MODELSERVE_LXD_SUBNET to a free /24"
  fi
}

configured() {
  lxc storage show "$POOL" >/dev/null 2>&1 || return 1
  [[ "$(lxc network get "$BRIDGE" ipv4.address 2>/dev/null)" == "$SUBNET" ]] || return 1
  [[ "$(lxc network get "$BRIDGE" ipv4.nat 2>/dev/null)" == "true" ]] || return 1
  [[ "$(lxc profile device get default eth0 network 2>/dev/null)" == "$BRIDGE" ]] || return 1
  [[ "$(lxc profile device get default root pool 2>/dev/null)" == "$POOL" ]] || return 1
  [[ "$(lxc config get images.compression_algorithm 2>/dev/null)" == "$COMPRESSION" ]] || return 1
}

ensure_config() {
  configured && return 0
  check_subnet
  log "lxd init --preseed (pool $POOL, bridge $BRIDGE $SUBNET, NAT on)"
  lxd init --preseed <<YAML
config:
  images.auto_update_interval: "0"
  images.compression_algorithm: $COMPRESSION
networks:
- name: $BRIDGE
  type: bridge
  config:
    ipv4.address: $SUBNET
    ipv4.nat: "true"
    ipv6.address: none
storage_pools:
- name: $POOL
  driver: dir
profiles:
- name: default
  devices:
    eth0:
      name: eth0
      network: $BRIDGE
      type: nic
    root:
      path: /
      pool: $POOL
      type: disk
YAML
  configured || die "LXD configuration did not take; see 'lxc network show $BRIDGE'"
}

# A copy-on-write pool makes a launch a clone of the image's volume (about 1 s) instead of an
# unpack of the whole TensorFlow rootfs (12-30 s on the dir pool). The bake and rollout use it
# when it exists (packer/bake.py, rollout/clouds/lxd.py); without it they fall back to the
# profile's pool, so a machine without btrfs or loop devices works as before, only slower.
ensure_cow_pool() {
  [[ "${MODELSERVE_LXD_COW:-1}" == 0 ]] && return 0
  lxc storage show "$COW_POOL" >/dev/null 2>&1 && return 0
  local why="" out
  if ! grep -qw btrfs /proc/filesystems && ! modprobe btrfs 2>/dev/null; then
    why="the kernel has no btrfs"
  elif ! command -v mkfs.btrfs >/dev/null; then
    why="mkfs.btrfs is missing"
  elif ! out="$(lxc storage create "$COW_POOL" btrfs size="${MODELSERVE_LXD_COW_SIZE:-40GiB}" 2>&1)"; then
    why="lxc storage create failed: ${out//$'\n'/ }"
  fi
  if [[ -n "$why" ]]; then
    log "no copy-on-write pool ($why): releases launch on the dir pool '$POOL' (slower:"
    log "  each launch unpacks the image); set MODELSERVE_LXD_COW=0 to silence this"
    return 0
  fi
  log "copy-on-write pool $COW_POOL (btrfs, loop-backed): launches clone the image"
}

main() {
  [[ $EUID -eq 0 ]] || die "run as root (LXD daemon and bridge set-up)"
  local t0=$SECONDS
  exec 9>"$LOCK"
  flock -w 900 9 || die "another local-cloud set-up holds $LOCK"
  ensure_packages
  [[ "${1:-}" == --packages-only ]] && return 0
  ensure_daemon
  ensure_config
  ensure_cow_pool
  if [[ "${MODELSERVE_SKIP_BASE:-0}" != 1 ]]; then
    "$here/build-base.sh"
  fi
  log "local LXD cloud ready: bridge $BRIDGE ($SUBNET), pool $POOL, base $BASE_ALIAS ($((SECONDS - t0)) s)"
}

main "$@"
