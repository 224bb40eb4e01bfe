# shellcheck shell=bash
# Shared by the host-side local-cloud scripts: logging, errors, retry, names.
# shellcheck disable=SC2034  # the variables are used by the scripts that source this
BASE_ALIAS="${MODELSERVE_BASE_ALIAS:-modelserve-base-debian12}"
CACHE_DIR="${MODELSERVE_CACHE:-/var/cache/modelserve}"
# Publishing a multi-GB TensorFlow rootfs with gzip costs minutes; zstd is several times faster.
COMPRESSION="${MODELSERVE_LXD_COMPRESSION:-zstd}"

log() { printf '%s [local-cloud] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '%s [local-cloud] ERROR: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; exit 1; }
trap 'die "${BASH_SOURCE[0]##*/} failed at line $LINENO: $BASH_COMMAND"' ERR

retry() {
  local n=$1 i=1; shift
  until "$@"; do
    ((i >= n)) && return 1
    log "retry $i/$n: $*"; sleep $((i * 3)); ((i++))
  done
}
