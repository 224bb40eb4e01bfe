"""Web routes and metrics with a stand-in client (pure logic; the real broker path is in
tests/integration)."""

import pytest

from app.config import load_config
from app.dispatch import Unavailable
from app.web import create_app

CFG = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/modelserve",
       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
       "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_RELEASE": "r7",
       "MODELSERVE_COLOUR": "green", "MODELSERVE_MAX_BATCH_ROWS": "3"}


class StubClient:
    """Answers 0.25 per row, or raises Unavailable when `down`."""

    def __init__(self, sha):
        self.sha, self.down = sha, False

    def predict(self, rows):
        if self.down:
            raise Unavailable("no worker answered within 5.0s")
        return [0.25] * len(rows), self.sha

    def queue_depth(self):
        return None if self.down else 3


@pytest.fixture
def client(bundle):
    stub = StubClient(bundle.sha256)
    app = create_app(load_config(CFG), bundle, client=stub)
    c = app.test_client()
    c.stub = stub
    yield c
    # /metrics started the diagnostics refresher: stop it with the app (a served app's client
    # stops it on close)
    app.extensions["modelserve"]["diagnostics"].stop()


ROW = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}


def test_prediction_response_shape(client, bundle):
    r = client.post("/api/v1/predictions", json={"instances": [ROW, ROW]})
    assert r.status_code == 200
    assert r.json == {"predictions": [{"probability": 0.25, "label": 0}] * 2,
                      "model": {"version": bundle.version, "sha256": bundle.sha256}}


def test_unavailable_is_503_json_with_retry_after(client):
    client.stub.down = True
    r = client.post("/api/v1/predictions", json={"instances": [ROW]})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json["error"]["type"] == "unavailable" and "no worker" in r.json["error"]["message"]


def test_configured_batch_limit_applies(client):
    r = client.post("/api/v1/predictions", json={"instances": [ROW] * 4})
    assert r.status_code == 413 and r.json["error"]["rule"] == "max_items"


@pytest.mark.parametrize("path, status", [("/nope", 404), ("/api/v1/tasks/not-a-uuid", 404)])
def test_unknown_paths_are_json(client, path, status):
    r = client.get(path)
    assert r.status_code == status and "error" in r.json


def test_wrong_method_is_json_405(client):
    r = client.get("/api/v1/predictions")
    assert r.status_code == 405 and r.json["error"]["type"] == "method_not_allowed"


def test_unknown_query_parameter_is_named(client):
    r = client.post("/api/v1/predictions?sync=1", json={"instances": [ROW]})
    assert r.status_code == 400 and r.json["error"]["field"] == "sync"


def test_holdout_rows_are_the_bundles_sample_as_request_rows(client, bundle):
    r = client.get("/api/v1/model/holdout")
    assert r.status_code == 200
    body = r.json
    sample = bundle.metadata["holdout_sample"]
    assert (body["version"], body["sha256"]) == (bundle.version, bundle.sha256)
    assert len(body["rows"]) == len(sample) > 0
    assert body["rows"][0] == {n: sample[0]["features"][n] for n in bundle.feature_names}
    # the rows are valid prediction requests (the diff gate posts them as they are)
    p = client.post("/api/v1/predictions", json={"instances": body["rows"][:3]})
    assert p.status_code == 200 and len(p.json["predictions"]) == 3


def test_version_comes_from_config_and_bundle(client, bundle):
    v = client.get("/version").json
    assert (v["release"], v["colour"], v["role"]) == ("r7", "green", "front")
    assert v["model_sha256"] == bundle.sha256


def test_metrics_count_by_route_and_status(client):
    client.post("/api/v1/predictions", json={"instances": [ROW]})
    client.post("/api/v1/predictions", json={"instances": []})
    client.stub.down = True
    client.post("/api/v1/predictions", json={"instances": [ROW]})
    text = client.get("/metrics").get_data(as_text=True)
    for status in ("200", "400", "503"):
        assert (f'modelserve_http_requests_total{{method="POST",route="/api/v1/predictions",'
                f'status="{status}"}} 1.0') in text
    assert "modelserve_queue_depth -1.0" in text
    assert 'modelserve_http_request_duration_seconds_count{route="/api/v1/predictions"} 3.0' in text


def test_page_shows_every_holdout_row_and_scores_the_form(client, bundle):
    page = client.get("/").get_data(as_text=True)
    assert page.count("<tr") == len(bundle.metadata["holdout_sample"]) + 1
    assert f"{bundle.metadata['metrics']['accuracy']:.3f}" in page
    r = client.post("/", data={k: str(v) for k, v in ROW.items()})
    assert r.status_code == 200 and "probability of diabetes <b>0.250</b>" in r.get_data(as_text=True)
    bad = client.post("/", data={**{k: str(v) for k, v in ROW.items()}, "glu": "abc"})
    assert bad.status_code == 400 and "glu: glu must be a number" in bad.get_data(as_text=True)
