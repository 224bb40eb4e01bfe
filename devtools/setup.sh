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

install_venv() {
  # The venv is a pure function of the pinned files and the interpreter: it lives in the cache
  # keyed by their hash and .venv links to it, so a fresh clone on a machine that built it once
  # reuses it (CI clones anew each run). Without the cache it is simply built.
  local want cached stamp
  want=$( { cat requirements.txt requirements-rollout.txt requirements-dev.txt constraints.txt;
            "$PYTHON" -c 'import sys; print(sys.version)'; } | sha256sum | cut -c1-16)
  if [[ $VENV == .venv && ${MODELSERVE_VENV_CACHE:-1} == 1 ]]; then
    cached="$CACHE_ROOT/venvs/$want"
    mkdir -p "$CACHE_ROOT/venvs"
    exec 8>"$CACHE_ROOT/venvs/.lock"
    flock -w 1200 8 || { log "another set-up holds the venv cache lock"; exit 1; }
    if [[ ! -f $cached/.installed || $(cat "$cached/.installed") != "$want" ]]; then
      rm -rf "$cached"
      build_venv "$cached" "$want"
    fi
    exec 8>&-
    if [[ -L $VENV || ! -e $VENV ]]; then
      ln -sfn "$cached" "$VENV"
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
  local want cached
  want=$( { cat requirements-kserve.txt; "$PYTHON" -c 'import sys; print(sys.version)'; } \
          | sha256sum | cut -c1-16)
  cached="$CACHE_ROOT/venvs/kserve-$want"
  mkdir -p "$CACHE_ROOT/venvs"
  exec 8>"$CACHE_ROOT/venvs/.lock"
  flock -w 1200 8 || { log "another set-up holds the venv cache lock"; exit 1; }
  if [[ ! -f $cached/.installed || $(cat "$cached/.installed") != "$want" ]]; then
    rm -rf "$cached"
    log "creating $cached (the KServe SDK, for the protocol tests)"
    "$PYTHON" -m venv "$cached"
    "$cached/bin/pip" install -q --disable-pip-version-check --no-deps \
      -r requirements-kserve.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
    echo "$want" >"$cached/.installed"
  fi
  exec 8>&-
  ln -sfn "$cached" .venv-kserve
}

if [[ ${1:-} != --venv-only ]]; then install_apt; fi
install_venv
if [[ ${1:-} != --venv-only ]]; then install_kserve_venv; fi
log "ready: $VENV ($("$VENV/bin/python" --version))"
