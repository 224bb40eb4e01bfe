"""The standard protocols against the real stack (waitress → RabbitMQ → Celery worker → model),
driven by the real client library: tritonclient's HTTP InferenceServerClient for the Open
Inference Protocol (KServe V2), both JSON and binary tensor data. Every answer is compared
with the native POST /api/v1/predictions for the same rows.

The KServe Python SDK (``kserve``) does not install within the pins (see docs/protocols.md): its
REST client (V1 and V2) runs from its own venv, .venv-kserve, built by `make setup`.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.integration

import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton(stack):
    client = httpclient.InferenceServerClient(url=stack.url.removeprefix("http://"),
                                              network_timeout=60, connection_timeout=10)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def name(bundle):
    return bundle.metadata["name"]


@pytest.fixture(scope="module")
def matrix(bundle, holdout):
    """The held-out rows as a float32 [332, 7] array in the metadata's feature order."""
    instances, _ = holdout
    return np.array([[row[f] for f in bundle.feature_names] for row in instances], dtype=np.float32)


@pytest.fixture(scope="module")
def native(stack, holdout):
    """(probabilities, labels) of the native API for the whole held-out set."""
    instances, _ = holdout
    r = requests.post(stack.url + "/api/v1/predictions", json={"instances": instances}, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    return np.array([p["probability"] for p in preds]), np.array([p["label"] for p in preds])


def _matrix_input(x: np.ndarray, binary: bool):
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_server_live_ready_and_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "modelserve" and "binary_tensor_data" in meta["extensions"]


def test_model_ready_and_metadata(triton, bundle, name):
    assert triton.is_model_ready(name)
    assert triton.is_model_ready(name, model_version=bundle.version)
    assert not triton.is_model_ready("no-such-model")
    assert not triton.is_model_ready(name, model_version="9.9.9")
    for version in ("", bundle.version):
        meta = triton.get_model_metadata(name, model_version=version)
        assert meta["name"] == name and meta["versions"] == [bundle.version]
        assert meta["inputs"] == [{"name": "features", "datatype": "FP32",
                                   "shape": [-1, len(bundle.feature_names)]}]
        assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"probability": "FP32",
                                                                        "label": "INT32"}
        assert meta["parameters"]["sha256"] == bundle.sha256
        assert meta["parameters"]["feature_order"].split(",") == bundle.feature_names
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("no-such-model")
    assert err.value.status() == "404" and "no-such-model" in err.value.message()


@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (False, True),
                                                   (True, False)])
def test_whole_holdout_matches_native_api(triton, name, bundle, matrix, native, binary_in,
                                          binary_out):
    """JSON and binary tensors, both ways; the versioned route too."""
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out)
               for n in ("probability", "label")]
    result = triton.infer(name, [_matrix_input(matrix, binary_in)], outputs=outputs,
                          model_version=bundle.version if binary_in else "")
    probability, label = result.as_numpy("probability"), result.as_numpy("label")
    assert probability.dtype == np.float32 and probability.shape == (len(matrix),)
    assert label.dtype == np.int32 and label.shape == (len(matrix),)
    np.testing.assert_allclose(probability, native[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(label, native[1])
    response = result.get_response()
    assert (response["model_name"], response["model_version"]) == (name, bundle.version)


def test_default_outputs_come_back_binary(triton, name, matrix, native):
    """No outputs requested: tritonclient asks for all outputs as binary tensor data."""
    result = triton.infer(name, [_matrix_input(matrix[:5], binary=True)])
    outs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert set(outs) == {"probability", "label"}
    assert outs["probability"]["parameters"]["binary_data_size"] == 5 * 4
    np.testing.assert_allclose(result.as_numpy("probability"), native[0][:5], rtol=0, atol=1e-6)


def test_one_input_per_feature(triton, name, bundle, holdout, native):
    """Seven [N] inputs: integer features as INT64 (numpy's default), the others FP32."""
    instances, _ = holdout
    inputs = []
    for i, f in enumerate(bundle.metadata["features"]):
        dtype = np.int64 if f["type"] == "integer" else np.float32
        column = np.array([row[f["name"]] for row in instances], dtype=dtype)
        inp = httpclient.InferInput(f["name"], [len(column)], "INT64" if dtype is np.int64 else "FP32")
        inp.set_data_from_numpy(column, binary_data=bool(i % 2))  # JSON and binary mixed
        inputs.append(inp)
    inputs.reverse()  # order of the inputs does not matter, their names do
    result = triton.infer(name, inputs)
    np.testing.assert_allclose(result.as_numpy("probability"), native[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), native[1])


def test_requested_output_and_id_echo(triton, name, matrix, native):
    result = triton.infer(name, [_matrix_input(matrix[:20], binary=False)], request_id="req-42",
                          outputs=[httpclient.InferRequestedOutput("label", binary_data=False)])
    response = result.get_response()
    assert response["id"] == "req-42"
    assert [o["name"] for o in response["outputs"]] == ["label"]
    assert result.as_numpy("probability") is None
    np.testing.assert_array_equal(result.as_numpy("label"), native[1][:20])


def test_batch_of_1000_rows(triton, name, matrix, native):
    reps = -(-1000 // len(matrix))
    x = np.tile(matrix, (reps, 1))[:1000]
    expected = np.tile(native[0], reps)[:1000]
    result = triton.infer(name, [_matrix_input(x, binary=True)])
    assert result.as_numpy("probability").shape == (1000,)
    np.testing.assert_allclose(result.as_numpy("probability"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case, status, words", [
    ("unknown_output", "400", ["'score'", "probability, label"]),
    ("out_of_range", "400", ["'features' [3, 1] (glu)", "outside"]),
    ("wrong_width", "400", ["'features'", "[N, 7]"]),
    ("wrong_datatype", "400", ["'features'", "BYTES"]),
    ("unknown_model", "404", ["no-such-model"]),
    ("unknown_version", "404", ["'9.9.9'"]),
])
def test_errors_through_the_client(triton, name, matrix, case, status, words):
    x = matrix[:5].copy()
    model, version = name, ""
    outputs = None
    inp = _matrix_input(x, binary=False)
    if case == "unknown_output":
        outputs = [httpclient.InferRequestedOutput("score", binary_data=False)]
    elif case == "out_of_range":
        x[3, 1] = 400.0
        inp = _matrix_input(x, binary=True)
    elif case == "wrong_width":
        inp = _matrix_input(x[:, :5], binary=False)
    elif case == "wrong_datatype":
        inp = httpclient.InferInput("features", [5, 7], "BYTES")
        inp.set_data_from_numpy(x.astype(str).astype(np.object_), binary_data=False)
    elif case == "unknown_model":
        model = "no-such-model"
    elif case == "unknown_version":
        version = "9.9.9"
    with pytest.raises(InferenceServerException) as err:
        triton.infer(model, [inp], outputs=outputs, model_version=version)
    assert err.value.status() == status, err.value
    for word in words:
        assert word in err.value.message(), err.value.message()


# --- V1 (TF Serving / KServe V1) ------------------------------------------------------------

def test_v1_model_status(stack, bundle, name):
    body = requests.get(f"{stack.url}/v1/models/{name}", timeout=15).json()
    assert body["name"] == name and body["ready"] is True
    assert body["model_version_status"][0]["state"] == "AVAILABLE"
    assert requests.get(f"{stack.url}/v1/models/nope", timeout=15).status_code == 404


def test_v1_predict_matches_native_api(stack, bundle, name, holdout, matrix, native):
    """Rows as objects and as 7-number lists, mixed; the body is sent as KServe's
    InferenceRESTClient sends it (no Content-Type)."""
    instances, _ = holdout
    rows = [row if i % 2 else matrix[i].tolist() for i, row in enumerate(instances)]
    import json

    r = requests.post(f"{stack.url}/v1/models/{name}:predict",
                      data=json.dumps({"instances": rows}).encode(), timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    np.testing.assert_allclose([p["probability"] for p in preds], native[0], rtol=0, atol=1e-6)
    assert [p["label"] for p in preds] == native[1].tolist()


# --- the KServe Python SDK's REST client (V1 and V2) ----------------------------------------
# kserve does not install within the pins (docs/protocols.md says which pin blocks each
# version), so it runs from its own venv: .venv-kserve, which `make setup` builds from
# requirements-kserve.txt (MODELSERVE_KSERVE_PYTHON overrides).

KSERVE_SCRIPT = r'''
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, RESTConfig, InferInput, InferRequest
from kserve.protocol.infer_type import RequestedOutput

url, name, version = sys.argv[1:4]
rows = np.array(json.load(sys.stdin), dtype=np.float32)

async def main():
    out = {}
    v2 = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    out["v2_live"] = await v2.is_server_live(url)
    out["v2_ready"] = await v2.is_server_ready(url)
    out["v2_model_ready"] = await v2.is_model_ready(url, name)
    out["v2_unknown_model_ready"] = await v2.is_model_ready(url, "no-such-model")
    for binary in (False, True):
        inp = InferInput("features", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=binary)
        req = InferRequest(name, [inp], request_id=f"kserve-{binary}", model_version=version)
        res = await v2.infer(url, req, model_name=name)
        got = {o.name: o.as_numpy().tolist() for o in res.outputs}
        out[f"v2_binary_{binary}"] = {"id": res.id, **got}
    req = InferRequest(name, [inp], request_outputs=[RequestedOutput("label")])
    res = await v2.infer(url, req, model_name=name)
    out["v2_label_only"] = [o.name for o in res.outputs]
    try:
        await v2.infer(url, InferRequest(name, [inp], request_outputs=[RequestedOutput("score")]),
                       model_name=name)
        out["v2_unknown_output"] = None
    except Exception as exc:
        out["v2_unknown_output"] = str(exc)
    await v2.close()
    v1 = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60))
    out["v1_model_ready"] = await v1.is_model_ready(url, name)
    res = await v1.infer(url, {"instances": rows.tolist()}, model_name=name)
    out["v1_predictions"] = res["predictions"]
    await v1.close()
    print(json.dumps(out))

asyncio.run(main())
'''


def test_kserve_sdk_rest_client_v1_and_v2(stack, bundle, name, matrix, native):
    import json
    import os
    import subprocess
    from pathlib import Path

    default = Path(__file__).resolve().parents[2] / ".venv-kserve" / "bin" / "python"
    python = os.environ.get("MODELSERVE_KSERVE_PYTHON") or str(default)
    assert Path(python).exists(), (f"{python} is missing: `make setup` (devtools/setup.sh) builds "
                                   ".venv-kserve from requirements-kserve.txt")
    proc = subprocess.run([python, "-c", KSERVE_SCRIPT, stack.url, name, bundle.version],
                          input=json.dumps(matrix.tolist()), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["v2_live"] is True and out["v2_ready"] is True
    assert out["v2_model_ready"] is True and out["v2_unknown_model_ready"] is False
    for binary in (False, True):
        got = out[f"v2_binary_{binary}"]
        assert got["id"] == f"kserve-{binary}"
        np.testing.assert_allclose(got["probability"], native[0], rtol=0, atol=1e-6)
        assert got["label"] == native[1].tolist()
    assert out["v2_label_only"] == ["label"]
    assert "400" in out["v2_unknown_output"] and "'score'" in out["v2_unknown_output"]
    assert out["v1_model_ready"] is True
    np.testing.assert_allclose([p["probability"] for p in out["v1_predictions"]], native[0],
                               rtol=0, atol=1e-6)
    assert [p["label"] for p in out["v1_predictions"]] == native[1].tolist()
