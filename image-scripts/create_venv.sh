#!/usr/bin/env bash
# The Python virtualenv of the model server (TensorFlow included) from the pinned requirements.
# Offline from the host's wheelhouse (mounted at $WHEELHOUSE) when one is there, else from the
# index with the same pins. Skipped when the venv already matches the requirements' hash.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants deps || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
req="$INPUTS_DIR/requirements.txt"
con="$INPUTS_DIR/constraints.txt"
[[ -s "$req" && -s "$con" ]] || die "missing $req or $con (the bake inputs)"
venv="$MODELSERVE_PREFIX/venv"
stamp="$venv/.modelserve-requirements.sha256"

pkg::installed python3-venv || apt::install python3-venv
want="$( { python3 -VV; cat "$req" "$con"; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  log::info "venv up to date ($venv)"
  exit 0
fi

install -d -m 0755 "$MODELSERVE_PREFIX"
python3 -m venv --clear "$venv"
pip_opts=(--no-cache-dir --disable-pip-version-check --no-input -r "$req" -c "$con")
if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  log::info "installing from the wheelhouse $WHEELHOUSE (offline)"
  "$venv/bin/pip" install --no-index --find-links "$WHEELHOUSE" "${pip_opts[@]}"
else
  log::info "no wheelhouse: installing from the index"
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt retry 3 "$venv/bin/pip" install "${pip_opts[@]}"
fi
"$venv/bin/python" -m pip check
# Byte-compile now, as root: the service user cannot (and must not) write here.
"$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null || true
chown -R root:root "$venv"
chmod -R go-w "$venv"
echo "$want" >"$stamp"
log::info "venv ready: $("$venv/bin/python" -V), $(du -sh "$venv" | cut -f1)"
