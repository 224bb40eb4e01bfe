"""Release identity from the image (I8) and the quality floor's provenance (I4), bake to app.

packer/bake.py computes the provenance; image-scripts/install_app.sh writes RELEASE.json from
the same values (Packer hands them over as MODELSERVE_* variables); the app's /version reports
the file; the front's /api/v1/workers lists its workers' models (I7).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.client import workers_from_replies
from app.config import load_config
from app.identity import read_release_file
from app.web import create_app

ROOT = Path(__file__).resolve().parents[2]
CFG = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/modelserve",
       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
       "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_RELEASE": "r7",
       "MODELSERVE_COLOUR": "green", "MODELSERVE_DEPLOY_ID": "d7"}


def load_bake():
    spec = importlib.util.spec_from_file_location("bake_for_identity", ROOT / "packer" / "bake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def release_json_writer() -> str:
    """The Python that install_app.sh runs to write RELEASE.json."""
    text = (ROOT / "image-scripts" / "install_app.sh").read_text()
    match = re.search(r"RELEASE\.json\" <<'PY'\n(.*?)\nPY\n", text, re.S)
    assert match, "install_app.sh no longer writes RELEASE.json with a Python heredoc"
    return match.group(1)


class StubClient:
    def __init__(self, sha, workers=()):
        self.sha, self._workers = sha, list(workers)

    def predict(self, rows):
        return [0.25] * len(rows), self.sha

    def workers(self):
        return self._workers

    def queue_depth(self):
        return 0


def app_client(bundle, **env):
    return create_app(load_config({**CFG, **env}), bundle, client=StubClient(bundle.sha256,
                      [{"node": "modelserve-worker-1@w1", "instance": "w1", "role": "worker",
                        "model_sha256": bundle.sha256}])).test_client()


# -- bake -> RELEASE.json -> /version ---------------------------------------------------------
def test_bake_provenance_carries_floor_and_provenance(tmp_path):
    bake = load_bake()
    app = tmp_path / "app"
    shutil.copytree(ROOT / "app", app, ignore=shutil.ignore_patterns("__pycache__"))
    prov = bake.provenance(app)
    meta = json.loads((ROOT / "app" / "bundle" / "metadata.json").read_text())
    assert float(prov["accuracy_floor"]) == meta["accuracy_floor"]
    assert prov["provenance"] == "release"
    # a bundle trained before the floor was recorded: derived from its held-out labels
    del meta["accuracy_floor"]
    (app / "bundle" / "metadata.json").write_text(json.dumps(meta))
    assert bake.provenance(app)["accuracy_floor"] == prov["accuracy_floor"]
    meta["holdout_sample"] = []
    (app / "bundle" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(bake.BakeError, match="accuracy_floor"):
        bake.provenance(app)


def test_every_provenance_key_becomes_an_image_property_and_a_build_variable():
    bake = load_bake()
    locals_hcl = (ROOT / "packer" / "locals.pkr.hcl").read_text()
    variables = (ROOT / "packer" / "variables.pkr.hcl").read_text()
    for key in bake.provenance(ROOT / "app"):
        assert re.search(rf"modelserve_{key}\s*=", locals_hcl), key
        assert f'"MODELSERVE_{key.upper()}=${{var.{key}}}"' in locals_hcl, key
        assert f'variable "{key}"' in variables, key


def test_release_json_holds_what_the_bake_put_in_the_properties(tmp_path, bundle):
    prov = load_bake().provenance(ROOT / "app")
    env = {**os.environ, "MODELSERVE_RELEASE": "r20261126-0630-abc"}
    env.update({f"MODELSERVE_{k.upper()}": v for k, v in prov.items()})
    out = tmp_path / "RELEASE.json"
    subprocess.run([sys.executable, "-", str(out)], input=release_json_writer(), text=True,
                   env=env, check=True)
    doc, problem = read_release_file(out)
    assert problem == "" and doc is not None
    for key in ("git_sha", "app_version", "model_sha256", "built_at", "provenance"):
        assert doc[key] == prov[key], key
    assert doc["release"] == "r20261126-0630-abc"
    assert doc["accuracy_floor"] == float(prov["accuracy_floor"])
    # and the app reports it
    v = app_client(bundle, MODELSERVE_RELEASE_FILE=str(out)).get("/version").json
    assert (v["release"], v["git_sha"], v["built_at"]) == (
        "r20261126-0630-abc", prov["git_sha"], prov["built_at"])
    assert v["image_model_sha256"] == prov["model_sha256"] == v["model_sha256"]
    assert v["seed_release"] == "r7" and v["deploy_id"] == "d7" and v["colour"] == "green"
    assert v["image"]["provenance"] == "release"


def test_version_without_release_json_falls_back_to_the_config(tmp_path, bundle):
    v = app_client(bundle, MODELSERVE_RELEASE_FILE=str(tmp_path / "none.json")).get(
        "/version").json
    assert v["image"] is None and v["release"] == "r7" and v["git_sha"] is None
    assert "image_error" not in v


def test_a_malformed_release_json_is_named(tmp_path, bundle):
    bad = tmp_path / "RELEASE.json"
    bad.write_text('{"release": "r1"}')
    v = app_client(bundle, MODELSERVE_RELEASE_FILE=str(bad)).get("/version").json
    assert v["image"] is None and "not an object with string" in v["image_error"]
    bad.write_text("{nope")
    doc, problem = read_release_file(bad)
    assert doc is None and "unreadable" in problem


def test_default_release_file_is_where_the_bake_installs_it():
    assert load_config(CFG).release_file == "/opt/modelserve/RELEASE.json"
    assert 'MODELSERVE_PREFIX/RELEASE.json' in (ROOT / "image-scripts" / "install_app.sh").read_text()


# -- I7: the front lists its workers ----------------------------------------------------------
def test_workers_endpoint_lists_hostnames_and_models(bundle):
    r = app_client(bundle).get("/api/v1/workers")
    assert r.status_code == 200
    body = r.json
    assert 0 <= body.pop("age_s") < 15  # from the diagnostics snapshot, with its age
    assert body == {"model_sha256": bundle.sha256, "workers": [
        {"node": "modelserve-worker-1@w1", "instance": "w1", "role": "worker",
         "model_sha256": bundle.sha256}]}
    assert "amqp" not in r.get_data(as_text=True)


def test_workers_from_broadcast_replies():
    replies = [{"modelserve-worker-9@b": {"sha256": "s", "instance": "b", "role": "worker"}},
               {"modelserve-front-1@a.novalocal": {"error": "No such key: 'modelserve_model'"}}]
    assert workers_from_replies(replies) == [
        {"node": "modelserve-front-1@a.novalocal", "instance": "a.novalocal", "role": None,
         "model_sha256": None},
        {"node": "modelserve-worker-9@b", "instance": "b", "role": "worker",
         "model_sha256": "s"}]
    assert workers_from_replies(None) == []


def test_worker_answers_the_identity_broadcast():
    from celery.worker.control import Panel

    from app.worker import IDENTITY_COMMAND, register_identity

    register_identity("f" * 64, "ms-dev-r1-worker1-d1", "worker")
    assert Panel.data[IDENTITY_COMMAND](None) == {
        "sha256": "f" * 64, "instance": "ms-dev-r1-worker1-d1", "role": "worker"}
