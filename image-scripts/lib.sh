# shellcheck shell=bash
# Sourced by every image-scripts/*.sh phase while the image bakes (inside the build instance).
# Gives: strict mode, timestamped logging, an ERR trap that names the failing script and line,
# retry N cmd, apt helpers, and the build inputs' locations. Versions/paths come from Packer as
# environment variables (see packer/build.pkr.hcl); the defaults here only serve manual runs.
set -Eeuo pipefail
shopt -s inherit_errexit

# shellcheck disable=SC2034  # used by the phase scripts
{
  MODELSERVE_PREFIX="${MODELSERVE_PREFIX:-/opt/modelserve}"
  MODELSERVE_USER="${MODELSERVE_USER:-modelserve}"
  MODELSERVE_LAYER="${MODELSERVE_LAYER:-full}"
  BUILD_DIR="${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}"
  INPUTS_DIR="$BUILD_DIR/inputs"
  FILES_DIR="$BUILD_DIR/scripts/files"
  WHEELHOUSE="${MODELSERVE_WHEELHOUSE:-/mnt/wheelhouse}"
}
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

_script="${0##*/}"
log::info() { printf '%s [%s] %s\n' "$(date -u +%H:%M:%S)" "$_script" "$*"; }
log::error() { printf '%s [%s] ERROR: %s\n' "$(date -u +%H:%M:%S)" "$_script" "$*" >&2; }
die() { log::error "$* (${_script}:${BASH_LINENO[0]})"; exit 1; }

_on_err() {
  local rc=$? line=$1 cmd=$2
  log::error "failed at ${_script}:${line} (exit ${rc}): ${cmd}"
  exit "$rc"
}
trap '_on_err "$LINENO" "$BASH_COMMAND"' ERR

# retry N cmd...: run cmd up to N times, backing off 2, 4, 6... seconds.
retry() {
  local n=$1 i=1
  shift
  until "$@"; do
    if ((i >= n)); then
      log::error "gave up after $n tries: $*"
      return 1
    fi
    log::info "try $i/$n failed, retrying: $*"
    sleep $((2 * i))
    i=$((i + 1))
  done
}

# layer::wants release|deps: true when this bake's layer includes that kind of phase.
# full = everything (OpenStack), deps = OS packages + venv, release = app on top of deps.
layer::wants() {
  [[ "$MODELSERVE_LAYER" == full || "$MODELSERVE_LAYER" == "$1" ]]
}

pkg::installed() {
  local p
  for p in "$@"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || return 1
  done
}

apt::install() {
  local apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
    --no-install-recommends)
  retry 3 apt-get update -q
  retry 3 apt-get install "${apt_opts[@]}" "$@"
}

# Wait until the instance has booted far enough to have a network (cloud-init done).
boot::wait() {
  if command -v cloud-init >/dev/null; then
    timeout 300 cloud-init status --wait >/dev/null || true
  fi
}
