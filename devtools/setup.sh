#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for the app tier: apt packages and the pinned
# .venv. Caches (pip wheels) live under /var/cache/modelserve and are used when present, never
# required. Usage: devtools/setup.sh [--venv-only]
set -Eeuo pipefail
trap 'echo "setup.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(rabbitmq-server redis-server wrk shellcheck cloud-init)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-/var/cache/modelserve/pip}
export DEBIAN_FRONTEND=noninteractive

log() { printf '%s setup: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "apt-get install ${missing[*]}"
  # Package scripts must not start services: there is no init system here, tests start
  # private nodes of their own.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

install_venv() {
  local stamp="$VENV/.installed" want
  want=$(cat requirements.txt requirements-rollout.txt requirements-dev.txt constraints.txt | sha256sum | cut -c1-16)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return 0; fi
  log "creating $VENV from the pinned requirements"
  [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
  mkdir -p "$PIP_CACHE_DIR"
  # (this machine's pip config lists local indexes that may be absent: drop that noise)
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt \
    -c constraints.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" >"$stamp"
}

if [[ ${1:-} != --venv-only ]]; then install_apt; fi
install_venv
log "ready: $VENV ($("$VENV/bin/python" --version))"
