"""The V2 (Open Inference Protocol) and V1 (TF Serving / KServe V1) request/response mapping,
through the Flask test client with a stand-in for BrokerClient (pure logic; the real broker
path and the real client libraries are in tests/integration/test_protocols.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app.config import load_config
from app.dispatch import Unavailable
from app.web import create_app

CFG = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/modelserve",
       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
       "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_MAX_BATCH_ROWS": "3"}
ROWS = [[1, 89, 66, 23, 28.1, 0.167, 21], [6, 148, 72, 35, 33.6, 0.627, 51],
        [0, 137, 40, 35, 43.1, 2.288, 33]]
NAMES = ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]


class FakeBroker:
    """Scores a row as glu / 300 (so feature order shows in the answer); the bundle's first
    held-out row gets the bundle's own probability (the /readyz smoke check). Records the rows
    it was sent; raises Unavailable when `down`."""

    def __init__(self, bundle):
        self.sha, self.down, self.sent = bundle.sha256, False, []
        first = bundle.metadata["holdout_sample"][0]
        self.known = {tuple(float(first["features"][n]) for n in bundle.feature_names):
                      first["probability"]}

    def _check(self):
        if self.down:
            raise Unavailable("no worker answered within 5.0s")

    def predict(self, rows, timeout=None):
        self._check()
        self.sent.append(rows)
        return [self.known.get(tuple(r), r[1] / 300) for r in rows], self.sha

    def check_broker(self):
        self._check()

    def check_workers(self):
        self._check()
        return 1

    def workers(self):
        self._check()
        return [{"node": "w@1", "instance": "1", "role": "worker", "model_sha256": self.sha}]

    def queue_depth(self):
        return None


@pytest.fixture
def client(bundle):
    fake = FakeBroker(bundle)
    c = create_app(load_config(CFG), bundle, client=fake).test_client()
    c.fake = fake
    return c


@pytest.fixture
def infer_url(bundle):
    return f"/v2/models/{bundle.metadata['name']}/infer"


def matrix(rows=ROWS, **extra):
    return {"name": "features", "shape": [len(rows), 7], "datatype": "FP32",
            "data": [v for r in rows for v in r], **extra}


def per_feature(rows=ROWS, shape=None):
    return [{"name": n, "shape": shape or [len(rows)], "datatype": "FP32",
             "data": [r[i] for r in rows]} for i, n in enumerate(NAMES)]


def glu_scores(rows=ROWS):
    return [r[1] / 300 for r in rows]


def assert_error(r, status, *words):
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))
    assert set(r.json) == {"error"} and isinstance(r.json["error"], str), r.json
    for word in words:
        assert word in r.json["error"], r.json["error"]


# --- metadata, health, readiness ------------------------------------------------------------

def test_server_metadata_and_liveness(client):
    assert client.get("/v2").json == {"name": "modelserve", "version": "0.1.0",
                                      "extensions": ["binary_tensor_data"]}
    r = client.get("/v2/health/live")
    assert r.status_code == 200 and r.json == {"live": True}


def test_readiness_runs_the_readyz_checks(client, bundle):
    name = bundle.metadata["name"]
    for url in ("/v2/health/ready", f"/v2/models/{name}/ready",
                f"/v2/models/{name}/versions/{bundle.version}/ready"):
        assert client.get(url).status_code == 200
    assert client.fake.sent, "the readiness check sends a real smoke prediction"


def test_not_ready_is_503(bundle):
    fake = FakeBroker(bundle)
    fake.down = True
    c = create_app(load_config(CFG), bundle, client=fake).test_client()
    name = bundle.metadata["name"]
    r = c.get("/v2/health/ready")
    assert r.status_code == 503 and r.json == {"ready": False}
    assert c.get(f"/v2/models/{name}/ready").json == {"name": name, "ready": False}
    r = c.get(f"/v1/models/{name}")
    assert r.status_code == 503 and r.json["ready"] is False
    assert r.json["model_version_status"][0]["state"] == "UNAVAILABLE"
    assert c.get("/v2/health/live").status_code == 200


def test_model_metadata(client, bundle):
    name = bundle.metadata["name"]
    meta = client.get(f"/v2/models/{name}").json
    assert client.get(f"/v2/models/{name}/versions/{bundle.version}").json == meta
    assert meta["name"] == name and meta["versions"] == [bundle.version] and meta["platform"]
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 7]}]
    assert meta["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]},
                               {"name": "label", "datatype": "INT32", "shape": [-1]}]
    assert meta["parameters"]["sha256"] == bundle.sha256
    assert meta["parameters"]["feature_order"] == ",".join(NAMES)


@pytest.mark.parametrize("method, suffix", [("get", ""), ("get", "/ready"), ("post", "/infer")])
def test_unknown_model_or_version_is_404(client, bundle, method, suffix):
    name = bundle.metadata["name"]
    call = getattr(client, method)
    kwargs = {"json": {"inputs": [matrix()]}} if method == "post" else {}
    assert_error(call(f"/v2/models/other{suffix}", **kwargs), 404, "'other'", name)
    assert_error(call(f"/v2/models/{name}/versions/2.0.0{suffix}", **kwargs), 404, "'2.0.0'",
                 bundle.version)
    assert not client.fake.sent


# --- infer ----------------------------------------------------------------------------------

def test_infer_matrix_flat(client, bundle, infer_url):
    r = client.post(infer_url, json={"inputs": [matrix()]})
    assert r.status_code == 200, r.json
    assert client.fake.sent == [[[float(v) for v in row] for row in ROWS]]
    assert r.json == {"model_name": bundle.metadata["name"], "model_version": bundle.version,
                      "outputs": [{"name": "probability", "datatype": "FP32", "shape": [3],
                                   "data": glu_scores()},
                                  {"name": "label", "datatype": "INT32", "shape": [3],
                                   "data": [0, 0, 0]}]}


def test_infer_matrix_nested_and_versioned(client, bundle, infer_url):
    """Nested data; KServe's client also sends the model's name and version in the body."""
    url = infer_url.replace("/infer", f"/versions/{bundle.version}/infer")
    r = client.post(url, json={"inputs": [matrix(data=ROWS)], "model_name": bundle.metadata["name"],
                               "model_version": bundle.version})
    assert r.status_code == 200 and r.json["outputs"][0]["data"] == glu_scores()
    assert client.fake.sent[0][2] == [float(v) for v in ROWS[2]]


def test_labels_follow_the_threshold(client, infer_url):
    rows = [[1, 200, 66, 23, 28.1, 0.167, 21], [1, 140, 66, 23, 28.1, 0.167, 21]]  # 0.667, 0.467
    r = client.post(infer_url, json={"inputs": [matrix(rows)], "outputs": [{"name": "label"}]})
    assert r.json["outputs"] == [{"name": "label", "datatype": "INT32", "shape": [2], "data": [1, 0]}]


@pytest.mark.parametrize("shape", [None, [3, 1]])
def test_infer_one_input_per_feature(client, infer_url, shape):
    inputs = per_feature(shape=shape)[::-1]  # any order
    inputs[0]["datatype"] = "INT64"  # age, an integer feature, as integers
    r = client.post(infer_url, json={"inputs": inputs})
    assert r.status_code == 200, r.json
    assert client.fake.sent == [[[float(v) for v in row] for row in ROWS]]
    assert r.json["outputs"][0]["data"] == glu_scores()


def test_requested_outputs_and_id_echo(client, infer_url):
    r = client.post(infer_url, json={"id": "abc-1", "inputs": [matrix()],
                                     "outputs": [{"name": "probability"}]})
    assert r.json["id"] == "abc-1"
    assert [o["name"] for o in r.json["outputs"]] == ["probability"]
    r = client.post(infer_url, json={"inputs": [matrix()], "outputs": [{"name": "label"},
                                                                        {"name": "probability"}]})
    assert "id" not in r.json
    assert [o["name"] for o in r.json["outputs"]] == ["label", "probability"]


def _binary_body(header: dict, *arrays) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(a.tobytes() for a in arrays), {"Inference-Header-Content-Length":
                                                          str(len(head))}


def _split(r):
    size = int(r.headers["Inference-Header-Content-Length"])
    body = r.get_data()
    return json.loads(body[:size]), body[size:]


def test_binary_tensor_data_in_and_out(client, infer_url):
    x = np.array(ROWS, dtype="<f4")
    body, headers = _binary_body({"id": "b", "inputs": [
        {"name": "features", "shape": [3, 7], "datatype": "FP32",
         "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True}}, x)
    r = client.post(infer_url, data=body, headers=headers,
                    content_type="application/octet-stream")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.content_type == "application/octet-stream"
    head, tail = _split(r)
    assert head["id"] == "b"
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [12, 12] and len(tail) == 24 and all("data" not in o for o in head["outputs"])
    np.testing.assert_allclose(np.frombuffer(tail[:12], "<f4"), glu_scores(), rtol=1e-6)
    assert np.frombuffer(tail[12:], "<i4").tolist() == [0, 0, 0]
    assert client.fake.sent == [x.astype(float).tolist()]


def test_binary_per_output_choice(client, infer_url):
    r = client.post(infer_url, json={"inputs": [matrix()], "outputs": [
        {"name": "probability"}, {"name": "label", "parameters": {"binary_data": True}}]})
    head, tail = _split(r)
    assert head["outputs"][0]["data"] == glu_scores()
    assert np.frombuffer(tail, "<i4").tolist() == [0, 0, 0]


def test_binary_and_json_inputs_mixed(client, infer_url):
    inputs = per_feature()
    glu = np.array([r[1] for r in ROWS], dtype="<f8")
    inputs[1] = {"name": "glu", "shape": [3], "datatype": "FP64",
                 "parameters": {"binary_data_size": glu.nbytes}}
    body, headers = _binary_body({"inputs": inputs}, glu)
    r = client.post(infer_url, data=body, headers=headers)
    assert r.status_code == 200 and r.json["outputs"][0]["data"] == glu_scores()


@pytest.mark.parametrize("mutate, status, words", [
    (lambda b: b["inputs"][0].update(shape=[3, 6], data=b["inputs"][0]["data"][:18]), 400,
     ["'features'", "[3, 6]", "[N, 7]"]),
    (lambda b: b["inputs"][0].update(datatype="BYTES"), 400, ["'features'", "BYTES"]),
    (lambda b: b["inputs"][0].update(datatype="FP16"), 400, ["'features'", "FP16"]),
    (lambda b: b["inputs"][0].update(data=b["inputs"][0]["data"][:-1]), 400,
     ["'features'", "20 values", "21"]),
    (lambda b: b["inputs"][0]["data"].__setitem__(8, 400), 400,
     ["'features' [1, 1] (glu)", "outside [0, 300]"]),
    (lambda b: b["inputs"][0]["data"].__setitem__(7, 1.5), 400,
     ["'features' [1, 0] (npreg)", "whole number"]),
    (lambda b: b["inputs"][0]["data"].__setitem__(13, "21"), 400,
     ["'features' [1, 6] (age)", "string"]),
    (lambda b: b["inputs"][0]["data"].__setitem__(2, True), 400, ["'features' [0, 2] (bp)"]),
    (lambda b: b["inputs"][0]["data"].__setitem__(2, None), 400, ["'features' [0, 2] (bp)"]),
    (lambda b: b["inputs"][0].update(shape=[0, 7], data=[]), 400, ["'features'", "0 rows"]),
    (lambda b: b["inputs"][0].update(shape=[4, 7], data=b["inputs"][0]["data"] + ROWS[0]), 413,
     ["'features'", "4 rows", "at most 3"]),
    (lambda b: b["inputs"][0].update(shape=[3, -7]), 400, ["'features'", "shape"]),
    (lambda b: b["inputs"][0].update(shape="3,7"), 400, ["'features'", "shape"]),
    (lambda b: b["inputs"][0].pop("data"), 400, ["'features'", "'data' is required"]),
    (lambda b: b["inputs"][0].update(data=5), 400, ["'features'", "array"]),
    (lambda b: b["inputs"][0].update(parameters={"binary_data_size": 84}), 400,
     ["'features'", "both"]),
    (lambda b: b["inputs"].clear(), 400, ["'inputs'"]),
    (lambda b: b["inputs"].__setitem__(0, "x"), 400, ["inputs[0]"]),
    (lambda b: b.update(outputs=[{"name": "score"}]), 400, ["'score'", "probability, label"]),
    (lambda b: b.update(outputs=["probability"]), 400, ["outputs[0]"]),
    (lambda b: b.update(outputs=[{"name": "label", "parameters": {"classification": 2}}]), 400,
     ["classification"]),
    (lambda b: b.update(outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}]), 400,
     ["binary_data"]),
    (lambda b: b.update(id=7), 400, ["'id'"]),
    (lambda b: b.update(parameters=[]), 400, ["'parameters'"]),
    (lambda b: b.update(parameters={"binary_data_output": 1}), 400, ["binary_data_output"]),
    (lambda b: b.update(instances=[]), 400, ["'instances'"]),
    (lambda b: b.update(model_name="other"), 400, ["model_name 'other'", "pima-diabetes"]),
    (lambda b: b.update(model_version="2"), 400, ["model_version '2'", "1.0.0"]),
])
def test_bad_matrix_requests(client, infer_url, mutate, status, words):
    body = {"inputs": [matrix()]}
    mutate(body)
    assert_error(client.post(infer_url, json=body), status, *words)
    assert not client.fake.sent


@pytest.mark.parametrize("mutate, words", [
    (lambda ins: ins.pop(3), ["'skin' is missing"]),
    (lambda ins: ins.append(dict(ins[0])), ["'npreg'", "more than once"]),
    (lambda ins: ins[2].update(name="blood_pressure"), ["'blood_pressure'", "unknown input"]),
    (lambda ins: ins[4].update(shape=[2], data=[1, 2]), ["'bmi'", "2 rows", "have 3"]),
    (lambda ins: ins[4].update(shape=[3, 2]), ["'bmi'", "[N]"]),
    (lambda ins: ins[5]["data"].__setitem__(1, 3.5), ["'ped' [1]", "outside [0, 3]"]),
    (lambda ins: ins[6].update(datatype="INT32", data=[21, 50.5, 33]), ["'age'", "50.5",
                                                                        "whole number"]),
])
def test_bad_per_feature_requests(client, infer_url, mutate, words):
    inputs = per_feature()
    mutate(inputs)
    assert_error(client.post(infer_url, json={"inputs": inputs}), 400, *words)
    assert not client.fake.sent


def test_non_finite_values_are_refused(client, infer_url):
    body = json.dumps({"inputs": [matrix()]}).replace("28.1", "NaN", 1)
    assert_error(client.post(infer_url, data=body), 400, "finite")
    x = np.array(ROWS, dtype="<f4")
    x[2, 4] = math.inf
    raw, headers = _binary_body({"inputs": [{"name": "features", "shape": [3, 7], "datatype": "FP32",
                                             "parameters": {"binary_data_size": x.nbytes}}]}, x)
    assert_error(client.post(infer_url, data=raw, headers=headers), 400,
                 "'features' [2, 4] (bmi)", "finite")
    assert not client.fake.sent


@pytest.mark.parametrize("header, extra, size, words", [
    ("abc", b"", 84, ["Inference-Header-Content-Length", "'abc'"]),
    ("999999", b"", 84, ["Inference-Header-Content-Length"]),
    (None, b"", 80, ["binary_data_size is 80", "84 bytes"]),
    (None, b"", 168, ["binary_data_size is 168"]),
    (None, b"\0" * 4, 84, ["4 bytes of binary data"]),
])
def test_bad_binary_requests(client, infer_url, header, extra, size, words):
    x = np.array(ROWS, dtype="<f4")
    body, headers = _binary_body({"inputs": [{"name": "features", "shape": [3, 7], "datatype": "FP32",
                                              "parameters": {"binary_data_size": size}}]}, x)
    if header is not None:
        headers["Inference-Header-Content-Length"] = header
    assert_error(client.post(infer_url, data=body + extra, headers=headers), 400, *words)


def test_binary_size_past_the_end(client, infer_url):
    x = np.array(ROWS[:2], dtype="<f4")
    body, headers = _binary_body({"inputs": [{"name": "features", "shape": [3, 7], "datatype": "FP32",
                                              "parameters": {"binary_data_size": 84}}]}, x)
    assert_error(client.post(infer_url, data=body, headers=headers), 400, "past the end")


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, ["body", "malformed JSON"]),
    (b"", 400, ["empty"]),
    (b"[1, 2]", 400, ["JSON object"]),
    (b'{"inputs": [], "inputs": []}', 400, ["'inputs'", "more than once"]),
    (b"[" * 40 + b"]" * 40, 400, ["nests"]),
    (json.dumps({"inputs": [matrix()], "pad": list(range(600))}).encode(), 413, ["JSON values"]),
])
def test_bad_bodies(client, infer_url, body, status, words):
    assert_error(client.post(infer_url, data=body, content_type="application/json"), status, *words)


def test_compressed_body_is_refused(client, infer_url):
    r = client.post(infer_url, json={"inputs": [matrix()]}, headers={"Content-Encoding": "gzip"})
    assert_error(r, 400, "gzip")


def test_broker_unavailable_is_503(client, infer_url, bundle):
    client.fake.down = True
    r = client.post(infer_url, json={"inputs": [matrix()]})
    assert_error(r, 503, "no worker")
    assert r.headers["Retry-After"] == "1"
    r = client.post(f"/v1/models/{bundle.metadata['name']}:predict", json={"instances": ROWS})
    assert_error(r, 503, "no worker")


def test_body_over_the_limit_is_413(bundle, infer_url):
    c = create_app(load_config({**CFG, "MODELSERVE_MAX_BODY_BYTES": "2000"}), bundle,
                   client=FakeBroker(bundle)).test_client()
    body = {"inputs": [matrix()], "id": "x" * 3000}
    assert_error(c.post(infer_url, json=body), 413, "2000 bytes")


def test_requests_are_counted_by_route(client, infer_url):
    client.post(infer_url, json={"inputs": [matrix()]})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'route="/v2/models/<name>/infer",status="200"' in text


# --- V1 -------------------------------------------------------------------------------------

def test_v1_model_status(client, bundle):
    name = bundle.metadata["name"]
    r = client.get(f"/v1/models/{name}")
    assert r.status_code == 200
    assert r.json == {"name": name, "ready": True, "model_version_status": [
        {"version": bundle.version, "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]}
    assert_error(client.get("/v1/models/other"), 404, "'other'")


def test_v1_predict_objects_and_lists(client, bundle):
    objects = [dict(zip(NAMES, r, strict=True)) for r in ROWS]
    r = client.post(f"/v1/models/{bundle.metadata['name']}:predict",
                    json={"instances": [objects[0], ROWS[1], objects[2]]})
    assert r.status_code == 200, r.json
    assert r.json == {"predictions": [{"probability": p, "label": 0} for p in glu_scores()]}
    assert client.fake.sent == [[[float(v) for v in row] for row in ROWS]]


@pytest.mark.parametrize("body, status, words", [
    ({"instances": [ROWS[0][:6]]}, 400, ["instances[0]", "6 values"]),
    ({"instances": [ROWS[0], {**dict(zip(NAMES, ROWS[1], strict=True)), "glu": 999}]}, 400,
     ["instances[1].glu", "outside"]),
    ({"instances": [ROWS[0][:6] + ["x"]]}, 400, ["instances[0].age", "string"]),
    ({"instances": [ROWS[0]] * 4}, 413, ["at most 3"]),
    ({"instances": []}, 400, ["at least 1"]),
    ({"instances": "x"}, 400, ["instances"]),
    ({"inputs": {"glu": [1]}}, 400, ["'inputs'", "columnar"]),
    ({"instances": [ROWS[0]], "signature_name": "other"}, 400, ["'other'"]),
    (["x"], 400, ["JSON object"]),
])
def test_v1_bad_requests(client, bundle, body, status, words):
    r = client.post(f"/v1/models/{bundle.metadata['name']}:predict", json=body)
    assert_error(r, status, *words)
    assert not client.fake.sent


def test_v1_unknown_model(client):
    assert_error(client.post("/v1/models/other:predict", json={"instances": ROWS}), 404, "'other'")


@pytest.mark.parametrize("method, path, status, words", [
    ("get", "/v2/models/pima-diabetes/infer", 405, ["GET", "use POST"]),
    ("post", "/v2/models/pima-diabetes", 405, ["POST", "use GET"]),
    ("get", "/v1/models/pima-diabetes:predict", 405, ["use POST"]),
    ("get", "/v2/models/pima-diabetes/stats", 404, ["/v2/models/pima-diabetes/stats"]),
    ("get", "/v2/repository/index", 404, ["no endpoint"]),
    ("delete", "/v1/models/pima-diabetes", 405, ["use GET"]),
    ("post", "/v1/models/pima-diabetes:explain", 404, ["'explain'", ":predict"]),
])
def test_unknown_endpoints_in_the_protocol_error_shape(client, method, path, status, words):
    r = getattr(client, method)(path)
    assert_error(r, status, *words)
