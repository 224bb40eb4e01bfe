#!/usr/bin/env bash
# The Python virtualenv of the model server (TensorFlow included) from requirements.lock, in
# pip's hash-checking mode (--require-hashes): every distribution pinned, every wheel's sha256
# checked against the lock. Offline from the host's wheelhouse (mounted at $WHEELHOUSE) when one
# is there, else from the index with the same lock. Skipped when the venv already matches the
# requirements' hash.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants deps || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
req="$INPUTS_DIR/requirements.txt"
con="$INPUTS_DIR/constraints.txt"
lock="$INPUTS_DIR/requirements.lock"
[[ -s "$req" && -s "$con" && -s "$lock" ]] || die "missing $req, $con or $lock (the bake inputs)"
venv="$MODELSERVE_PREFIX/venv"
stamp="$venv/.modelserve-requirements.sha256"

pkg::installed python3-venv || apt::install python3-venv
want="$( { python3 -VV; cat "$req" "$con" "$lock"; } | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  log::info "venv up to date ($venv)"
  exit 0
fi

install -d -m 0755 "$MODELSERVE_PREFIX"
python3 -m venv --clear "$venv"
pip_opts=(--no-cache-dir --disable-pip-version-check --no-input)
locked=(--only-binary=:all: --require-hashes -r "$lock")
# The lock was resolved for one Python (environment markers, cp311 wheels): its own line says which.
target="$(sed -n 's/^# target-python: //p' "$lock")"
have="$(python3 -c 'import platform; print(platform.python_version())')"
if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  [[ "$have" == "$target" ]] || die "python3 is $have, requirements.lock is for Python $target"
  log::info "installing requirements.lock from the wheelhouse $WHEELHOUSE (offline, --require-hashes)"
  "$venv/bin/pip" install --no-index --find-links "$WHEELHOUSE" "${pip_opts[@]}" "${locked[@]}"
elif [[ "$have" == "$target" ]]; then
  log::info "no wheelhouse: installing requirements.lock from the index (--require-hashes)"
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt retry 3 "$venv/bin/pip" install "${pip_opts[@]}" "${locked[@]}"
else
  # A base with another Python than the lock's (e.g. Ubuntu 24.04 set through an env's pkrvars;
  # the OpenStack default is Debian 12, like LXD): no locked hashes to check.
  log::info "WARNING: python3 is $have, requirements.lock is for Python $target: installing" \
    "requirements.txt + constraints.txt from the index WITHOUT hash checking"
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt retry 3 "$venv/bin/pip" install "${pip_opts[@]}" \
    -r "$req" -c "$con"
fi
"$venv/bin/python" -m pip check
# Byte-compile now, as root: the service user cannot (and must not) write here.
"$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null || true
chown -R root:root "$venv"
chmod -R go-w "$venv"
echo "$want" >"$stamp"
log::info "venv ready: $("$venv/bin/python" -V), $(du -sh "$venv" | cut -f1)"
