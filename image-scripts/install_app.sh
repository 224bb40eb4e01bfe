#!/usr/bin/env bash
# The app and its model bundle under $MODELSERVE_PREFIX/src (root-owned, read-only for the
# service user), checked against the bundle's own sha256, plus the release's provenance file.
set -Eeuo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "${MODELSERVE_BUILD_DIR:-/tmp/modelserve-build}/scripts/lib.sh"

layer::wants release || { log::info "layer $MODELSERVE_LAYER: skipped"; exit 0; }
: "${MODELSERVE_RELEASE:?set by Packer}" "${MODELSERVE_MODEL_SHA256:?set by Packer}"
tarball="$INPUTS_DIR/app.tar"
[[ -s "$tarball" ]] || die "missing $tarball (the bake inputs)"

id "$MODELSERVE_USER" >/dev/null 2>&1 \
  || useradd --system --user-group --home-dir /var/lib/modelserve --no-create-home \
    --shell /usr/sbin/nologin --comment "modelserve model server" "$MODELSERVE_USER"

src="$MODELSERVE_PREFIX/src"
rm -rf "$src.new"
install -d -m 0755 "$src.new"
tar -C "$src.new" --no-same-owner -xf "$tarball"
[[ -f "$src.new/app/__init__.py" && -f "$src.new/app/bundle/model.keras" ]] \
  || die "app.tar holds no app/ package with app/bundle/model.keras"
got="$(sha256sum "$src.new/app/bundle/model.keras" | cut -d' ' -f1)"
[[ "$got" == "$MODELSERVE_MODEL_SHA256" ]] \
  || die "model.keras sha256 $got != $MODELSERVE_MODEL_SHA256 (metadata.json)"
rm -rf "$src"
mv "$src.new" "$src"
"$MODELSERVE_PREFIX/venv/bin/python" -m compileall -q "$src" >/dev/null
chown -R root:root "$src"
chmod -R u=rwX,go=rX "$src"

# The image's own identity (what /version reports and the rollout gate compares with the
# image properties): the same values packer/bake.py sets as modelserve_* properties.
"$MODELSERVE_PREFIX/venv/bin/python" - "$MODELSERVE_PREFIX/RELEASE.json" <<'PY'
import json, os, sys

def num(key):
    try:
        return float(os.environ[key])
    except (KeyError, ValueError):
        return None

doc = {"release": os.environ["MODELSERVE_RELEASE"],
       "git_sha": os.environ.get("MODELSERVE_GIT_SHA", ""),
       "app_version": os.environ.get("MODELSERVE_APP_VERSION", ""),
       "model_sha256": os.environ["MODELSERVE_MODEL_SHA256"],
       "model_accuracy": num("MODELSERVE_MODEL_ACCURACY"),
       "accuracy_floor": num("MODELSERVE_ACCURACY_FLOOR"),
       "provenance": os.environ.get("MODELSERVE_PROVENANCE", "release"),
       "built_at": os.environ.get("MODELSERVE_BUILT_AT", "")}
with open(sys.argv[1], "w") as fh:
    json.dump(doc, fh, indent=1, sort_keys=True)
    fh.write("\n")
PY
chmod 0644 "$MODELSERVE_PREFIX/RELEASE.json"
install -d -m 0750 -o "$MODELSERVE_USER" -g "$MODELSERVE_USER" /var/lib/modelserve
# a smoke import with the baked venv: a broken app fails the bake, not the first boot
(cd "$src" && MODELSERVE_BROKER_URL=amqp://x@localhost// MODELSERVE_RESULT_URL=redis://localhost \
  "$MODELSERVE_PREFIX/venv/bin/python" -c 'import app.web, app.worker, app.config')
log::info "app $MODELSERVE_RELEASE installed in $src (model ${MODELSERVE_MODEL_SHA256:0:12})"
