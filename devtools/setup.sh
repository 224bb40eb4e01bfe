#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian 12 machine for the app tier: apt packages and the pinned
# .venv. Caches (pip wheels) live under /var/cache/modelserve and are used when present, never
# required. Usage: devtools/setup.sh [--venv-only]
set -Eeuo pipefail
trap 'echo "setup.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(rabbitmq-server redis-server wrk shellcheck cloud-init chromium chromium-driver)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE_ROOT=${MODELSERVE_CACHE:-/var/cache/modelserve}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$CACHE_ROOT/pip}
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

pins_hash() {  # pins_hash FILE...: what a venv is a pure function of (its pins, the python)
  { cat "$@"; "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16
}

cached_venv() {
  # cached_venv DIR WANT BUILDER: DIR holds the venv stamped WANT, else BUILDER DIR WANT makes
  # it, under the cache lock (concurrent set-ups wait)
  local dir=$1 want=$2 builder=$3
  mkdir -p "$CACHE_ROOT/venvs"
  exec 8>"$CACHE_ROOT/venvs/.lock"
  flock -w 1200 8 || { log "another set-up holds the venv cache lock"; exit 1; }
  if [[ ! -f $dir/.installed || $(cat "$dir/.installed") != "$want" ]]; then
    rm -rf "$dir"
    "$builder" "$dir" "$want"
  fi
  exec 8>&-
}

install_venv() {
  # The venv is a pure function of the pinned files and the interpreter: it lives in the cache
  # keyed by their hash and .venv links to it, so a fresh clone on a machine that built it once
  # reuses it (CI clones anew each run). Without the cache it is simply built.
  local want stamp
  want=$(pins_hash requirements.txt requirements-rollout.txt requirements-dev.txt constraints.txt)
  if [[ $VENV == .venv && ${MODELSERVE_VENV_CACHE:-1} == 1 ]]; then
    cached_venv "$CACHE_ROOT/venvs/$want" "$want" build_venv
    if [[ -L $VENV || ! -e $VENV ]]; then
      ln -sfn "$CACHE_ROOT/venvs/$want" "$VENV"
      return 0
    fi
    log "$VENV is a directory of its own: leaving it, not linking the cached venv"
  fi
  stamp="$VENV/.installed"
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then return 0; fi
  build_venv "$VENV" "$want"
}

build_venv() {
  local dir=$1 want=$2
  log "creating $dir from the pinned requirements"
  [[ -x $dir/bin/python ]] || "$PYTHON" -m venv "$dir"
  mkdir -p "$PIP_CACHE_DIR"
  # (this machine's pip config lists local indexes that may be absent: drop that noise)
  "$dir/bin/pip" install -q --disable-pip-version-check -r requirements-dev.txt \
    -c constraints.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" >"$dir/.installed"
}

install_kserve_venv() {
  # The KServe SDK's REST client (tests/integration/test_protocols.py) cannot share .venv's
  # pins: its own venv, cached the same way, linked as .venv-kserve.
  local want
  want=$(pins_hash requirements-kserve.txt)
  cached_venv "$CACHE_ROOT/venvs/kserve-$want" "$want" build_kserve_venv
  ln -sfn "$CACHE_ROOT/venvs/kserve-$want" .venv-kserve
}

build_kserve_venv() {
  local dir=$1 want=$2
  log "creating $dir (the KServe SDK, for the protocol tests)"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check --no-deps \
    -r requirements-kserve.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
  echo "$want" >"$dir/.installed"
}

if [[ ${1:-} != --venv-only ]]; then install_apt; fi
install_venv
if [[ ${1:-} != --venv-only ]]; then install_kserve_venv; fi
log "ready: $VENV ($("$VENV/bin/python" --version))"
