"""The standard inference protocols, beside the native ``POST /api/v1/predictions``.

* Open Inference Protocol (KServe V2) REST under ``/v2``: server and model metadata, health,
  readiness and ``infer`` (JSON tensors, and Triton's binary tensor data extension, which
  ``tritonclient`` uses by default).
* TF Serving / KServe V1 REST under ``/v1``: model status and ``:predict`` with
  ``{"instances": [...]}``.

Both share the native API's path: the parse budget, the pre-scan bounds (depth, values, rows),
the bundle's schema (``app.schema.validate_instances``: types, finite, whole numbers, ranges,
row limits), the micro-batcher and the broker (``state["client"].predict``). Errors follow the
protocols: ``{"error": "<message>"}`` with 400 (bad request; the message names the input and
element), 404 (unknown model or version), 413 (more rows or values than the limit), 503 with
``Retry-After`` (broker, workers or parse budget unavailable).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app import __version__
from app.bundle import Bundle
from app.dispatch import Unavailable
from app.limits import prescan
from app.schema import ValidationError, parse_json, validate_instances

v2 = Blueprint("v2", __name__, url_prefix="/v2")
v1 = Blueprint("v1", __name__, url_prefix="/v1")

SERVER_NAME = "modelserve"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
MATRIX_INPUT = "features"
# datatype -> little-endian NumPy dtype of the binary form; values arrive as JSON numbers
NUMERIC = {"FP32": "<f4", "FP64": "<f8", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4",
           "INT64": "<i8", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
OUTPUTS = {"probability": ("FP32", "<f4"), "label": ("INT32", "<i4")}
_ROW_FIELD = re.compile(r"^instances\[(\d+)\]\.(\w+)$")


class ProtocolError(Exception):
    """A request the protocol refuses: `status` and a message naming what is wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _state() -> dict[str, Any]:
    return current_app.extensions["modelserve"]


def model_name(bundle: Bundle) -> str:
    """The served model's name: the bundle's metadata ``name``."""
    return str(bundle.metadata.get("name") or "model")


def _bundle_for(name: str, version: str | None = None) -> Bundle:
    bundle: Bundle = _state()["bundle"]
    served = model_name(bundle)
    if name != served:
        raise ProtocolError(404, f"unknown model {name!r}; this server serves {served!r}")
    if version is not None and version != bundle.version:
        raise ProtocolError(404, f"unknown version {version!r} of model {served!r}; "
                            f"it has version {bundle.version!r}")
    return bundle


def _ready() -> tuple[bool, int]:
    """The /readyz answer (same code, same diagnostics snapshot): (ready, HTTP status)."""
    from app import web  # web imports this module in create_app; import here, not at load

    out = web.readyz()
    status = out[1] if isinstance(out, tuple) else out.status_code
    return status == 200, 200 if status == 200 else 503


def _read_json_body(max_rows: int, features: int, rows_prescan: bool) -> tuple[Any, bytes]:
    """(payload, binary tail) of the request body, parsed within the parse budget and bounds.

    The JSON part (the whole body, or its first ``Inference-Header-Content-Length`` bytes) is
    pre-scanned before ``json.loads``: more values than `max_rows` rows of `features` numbers
    (plus room for tensor headers) is a 413. With `rows_prescan` (V1, whose body is the native
    ``{"instances": [...]}``) the native row count pre-scan applies too."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ProtocolError(400, f"Content-Encoding {encoding!r} is not supported; send the body "
                            "uncompressed")
    config = _state()["config"]
    with _state()["parse_budget"].hold(request.content_length or config.max_body_bytes):
        body = request.get_data(cache=False)
        tail = b""
        header = request.headers.get(HEADER_LENGTH)
        if header is not None:
            try:
                size = int(header)
            except ValueError:
                size = -1
            if not 0 < size <= len(body):
                raise ProtocolError(400, f"{HEADER_LENGTH} is {header!r}; it must be the byte "
                                    f"length of the JSON header within the {len(body)}-byte body")
            body, tail = body[:size], body[size:]
        if rows_prescan:
            payload = parse_json(body, "application/json", max_rows=max_rows, features=features)
        else:
            max_values = max_rows * (features + 2) + 256
            values = prescan(body).values
            if values > max_values:
                raise ProtocolError(413, f"the body holds about {values} JSON values; at most "
                                    f"{max_values} are accepted ({max_rows} rows)")
            payload = parse_json(body, "application/json")
    return payload, tail


def _validate(instances: list[dict[str, Any]], bundle: Bundle, max_rows: int, field) -> list[list[float]]:
    """The native schema's checks; a failure is re-worded by `field(row, feature)`."""
    try:
        return validate_instances({"instances": instances}, bundle.metadata["features"], max_rows)
    except ValidationError as exc:
        m = _ROW_FIELD.match(exc.field)
        if m is None:
            raise
        raise ProtocolError(exc.status, f"{field(int(m.group(1)), m.group(2))}: {exc.message}") from None


def _register_errors(bp: Blueprint) -> None:
    @bp.errorhandler(ProtocolError)
    def _refused(exc: ProtocolError):
        return jsonify({"error": exc.message}), exc.status

    @bp.errorhandler(ValidationError)
    def _invalid(exc: ValidationError):
        return jsonify({"error": f"{exc.field}: {exc.message}"}), exc.status

    @bp.errorhandler(Unavailable)
    def _unavailable(exc: Unavailable):
        return jsonify({"error": str(exc)}), 503, {"Retry-After": "1"}

    @bp.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        limit = _state()["config"].max_body_bytes
        return jsonify({"error": f"request body exceeds {limit} bytes"}), 413


_register_errors(v1)
_register_errors(v2)
_ANY = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@v1.route("/<path:rest>", methods=_ANY)
@v2.route("/<path:rest>", methods=_ANY)
def unknown_endpoint(rest: str):
    """Any other path under /v1 or /v2: 405 when another method would match, else 404, in the
    protocols' error shape (the native API's shape is an object)."""
    verb = rest.rpartition("/")[2].partition(":")[2]
    if verb and verb != "predict":  # KServe V1's :explain, TF Serving's :classify, :regress
        return jsonify({"error": f"{verb!r} is not supported; only :predict is"}), 404
    adapter = current_app.url_map.bind_to_environ(request.environ)
    allowed = []
    for method in ("GET", "POST"):
        if method != request.method:
            try:
                endpoint, _args = adapter.match(method=method)
            except HTTPException:
                continue
            if not endpoint.endswith(".unknown_endpoint"):
                allowed.append(method)
    if allowed:
        return jsonify({"error": f"{request.method} is not allowed on {request.path}; use "
                                 f"{' or '.join(allowed)}"}), 405, {"Allow": ", ".join(allowed)}
    return jsonify({"error": f"no endpoint {request.path} (see GET /v2 and docs/protocols.md)"}), 404


def register_protocols(app: Flask) -> None:
    """Add the V2 (Open Inference Protocol) and V1 (TF Serving / KServe V1) REST APIs."""
    app.register_blueprint(v2)
    app.register_blueprint(v1)


# --- Open Inference Protocol (KServe V2) ----------------------------------------------------

def model_metadata(bundle: Bundle) -> dict[str, Any]:
    """The V2 model metadata: one FP32 [-1, 7] input in the bundle's feature order (one [-1]
    input per feature is accepted too), outputs probability and label; sha256 in parameters."""
    names = bundle.feature_names
    return {
        "name": model_name(bundle),
        "versions": [bundle.version],
        "platform": "keras",
        "inputs": [{"name": MATRIX_INPUT, "datatype": "FP32", "shape": [-1, len(names)]}],
        "outputs": [{"name": n, "datatype": d, "shape": [-1]} for n, (d, _) in OUTPUTS.items()],
        "parameters": {"sha256": bundle.sha256, "feature_order": ",".join(names),
                       "threshold": bundle.threshold,
                       "per_feature_inputs": f"or one input per feature, each of shape [-1]: "
                                             f"{', '.join(names)}"},
    }


@v2.get("")
def server_metadata():
    return jsonify({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


@v2.get("/health/live")
def live():
    return jsonify({"live": True})


@v2.get("/health/ready")
def server_ready():
    ready, status = _ready()
    return jsonify({"ready": ready}), status


@v2.get("/models/<name>")
@v2.get("/models/<name>/versions/<version>")
def v2_model(name: str, version: str | None = None):
    return jsonify(model_metadata(_bundle_for(name, version)))


@v2.get("/models/<name>/ready")
@v2.get("/models/<name>/versions/<version>/ready")
def v2_model_ready(name: str, version: str | None = None):
    bundle = _bundle_for(name, version)
    ready, status = _ready()
    return jsonify({"name": model_name(bundle), "ready": ready}), status


@v2.post("/models/<name>/infer")
@v2.post("/models/<name>/versions/<version>/infer")
def v2_infer(name: str, version: str | None = None):
    bundle = _bundle_for(name, version)
    config = _state()["config"]
    n_features = len(bundle.feature_names)
    payload, tail = _read_json_body(config.max_batch_rows, n_features, rows_prescan=False)
    request_id, outputs = infer_request_options(payload, bundle)
    rows = infer_rows(payload, tail, bundle, config.max_batch_rows)
    probabilities, _sha = _state()["client"].predict(rows)
    return infer_response(bundle, probabilities, outputs, request_id)


def infer_request_options(payload: Any, bundle: Bundle) -> tuple[str | None, list[tuple[str, bool]]]:
    """(id, [(output name, binary)]) of a V2 request; the whole request shape is checked.
    KServe's client also sends model_name (and may send model_version): they must name the
    served model."""
    if not isinstance(payload, dict):
        raise ProtocolError(400, "the request must be a JSON object with 'inputs'")
    extra = sorted(set(payload) - {"id", "parameters", "inputs", "outputs", "model_name",
                                   "model_version"})
    if extra:
        raise ProtocolError(400, f"unknown request field {extra[0]!r}; expected id, parameters, "
                            "inputs, outputs")
    for key, served in (("model_name", model_name(bundle)), ("model_version", bundle.version)):
        if key in payload and payload[key] != served:
            raise ProtocolError(400, f"{key} {payload[key]!r} in the body is not the served "
                                f"model's {served!r}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "'id' must be a string")
    params = payload.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(400, "'parameters' must be an object")
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise ProtocolError(400, "parameters.binary_data_output must be true or false")
    requested = payload.get("outputs")
    if requested is None or requested == []:
        return request_id, [(n, binary_all) for n in OUTPUTS]
    if not isinstance(requested, list):
        raise ProtocolError(400, "'outputs' must be an array of {\"name\": ...} objects")
    wanted: list[tuple[str, bool]] = []
    for i, out in enumerate(requested):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise ProtocolError(400, f"outputs[{i}] must be an object with a string 'name'")
        oname = out["name"]
        if oname not in OUTPUTS:
            raise ProtocolError(400, f"unknown output {oname!r}; this model has outputs "
                                f"{', '.join(OUTPUTS)}")
        oparams = out.get("parameters", {})
        if not isinstance(oparams, dict):
            raise ProtocolError(400, f"outputs[{i}].parameters must be an object")
        if "classification" in oparams:
            raise ProtocolError(400, f"output {oname!r}: the classification extension is not "
                                "supported")
        binary = oparams.get("binary_data", binary_all)
        if not isinstance(binary, bool):
            raise ProtocolError(400, f"output {oname!r}: parameters.binary_data must be true or false")
        if oname not in (w[0] for w in wanted):
            wanted.append((oname, binary))
    return request_id, wanted


def _shape(tensor: dict[str, Any], label: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(400, f"{label}: 'shape' must be an array of non-negative integers")
    return shape


def _flatten(data: Any, label: str, limit: int) -> list[Any]:
    """Row-major values of a flat or nested JSON array (depth is bounded by the pre-scan)."""
    if not isinstance(data, list):
        raise ProtocolError(400, f"{label}: 'data' must be an array")
    if all(not isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
            if len(flat) > limit:
                raise ProtocolError(400, f"{label}: 'data' holds more than the {limit} values "
                                    "its shape allows")
        else:
            stack.pop()
    return flat


def _tensor_values(tensor: dict[str, Any], label: str, count: int, tail: memoryview,
                   offset: int) -> tuple[list[Any], int]:
    """The `count` values of an input, from its JSON 'data' or its slice of the binary tail."""
    datatype = tensor.get("datatype")
    if datatype not in NUMERIC:
        raise ProtocolError(400, f"{label}: datatype {datatype!r} is not accepted; send FP32 "
                            f"(or another numeric type: {', '.join(NUMERIC)})")
    params = tensor.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(400, f"{label}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise ProtocolError(400, f"{label}: has both 'data' and binary_data_size")
        dtype = np.dtype(NUMERIC[datatype])
        if type(size) is not int or size != count * dtype.itemsize:
            raise ProtocolError(400, f"{label}: binary_data_size is {size!r}; a {datatype} tensor "
                                f"of {count} elements needs {count * dtype.itemsize} bytes")
        if offset + size > len(tail):
            raise ProtocolError(400, f"{label}: binary_data_size {size} runs past the end of the "
                                f"binary data ({len(tail) - offset} bytes left)")
        values = np.frombuffer(tail[offset:offset + size], dtype=dtype).tolist()
        return values, offset + size
    if "data" not in tensor:
        raise ProtocolError(400, f"{label}: 'data' is required")
    values = _flatten(tensor["data"], label, count)
    if len(values) != count:
        raise ProtocolError(400, f"{label}: 'data' holds {len(values)} values; shape "
                            f"{tensor['shape']} needs {count}")
    if datatype.startswith(("INT", "UINT")):
        for i, v in enumerate(values):
            if type(v) is float and math.isfinite(v) and not v.is_integer():
                raise ProtocolError(400, f"{label} [{i}]: {v} is not a whole number "
                                    f"(datatype {datatype})")
    return values, offset


def infer_rows(payload: dict[str, Any], tail: bytes, bundle: Bundle, max_rows: int) -> list[list[float]]:
    """Rows in feature order from a V2 request's inputs: one [N, 7] tensor, or one [N] (or
    [N, 1]) tensor per feature. Checked like the native API; errors name the input."""
    names = bundle.feature_names
    width = len(names)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "'inputs' must be a non-empty array of tensors")
    labels = []
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ProtocolError(400, f"inputs[{i}] must be an object with a string 'name'")
        labels.append(f"input {t['name']!r}")
    shapes = [_shape(t, label) for t, label in zip(inputs, labels, strict=True)]
    view = memoryview(tail)
    offset = 0
    if len(inputs) == 1 and len(shapes[0]) == 2 and shapes[0][1] != 1:  # one [N, 7] tensor
        tensor, label, shape = inputs[0], labels[0], shapes[0]
        if shape[1] != width:
            raise ProtocolError(400, f"{label}: shape {shape}; expected [N, {width}] with the "
                                f"features {', '.join(names)} in that order")
        n = shape[0]
        _check_rows(n, label, max_rows)
        flat, offset = _tensor_values(tensor, label, n * width, view, offset)
        instances = [dict(zip(names, flat[r * width:(r + 1) * width], strict=True)) for r in range(n)]
        field = lambda r, f: f"{label} [{r}, {names.index(f)}] ({f})"  # noqa: E731
    else:
        by_name: dict[str, list[Any]] = {}
        n = None
        for tensor, label, shape in zip(inputs, labels, shapes, strict=True):
            iname = tensor["name"]
            if iname not in names:
                hint = (f"send one [N, {width}] tensor, or one [N] tensor per feature: "
                        f"{', '.join(names)}")
                raise ProtocolError(400, f"{label}: unknown input; {hint}")
            if iname in by_name:
                raise ProtocolError(400, f"{label}: appears more than once")
            if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
                raise ProtocolError(400, f"{label}: shape {shape}; a per-feature input has "
                                    "shape [N] (or [N, 1])")
            if n is None:
                n = shape[0]
                _check_rows(n, label, max_rows)
            elif shape[0] != n:
                raise ProtocolError(400, f"{label}: shape {shape} has {shape[0]} rows; the other "
                                    f"inputs have {n}")
            by_name[iname], offset = _tensor_values(tensor, label, n, view, offset)
        missing = [f for f in names if f not in by_name]
        if missing:
            raise ProtocolError(400, f"input {missing[0]!r} is missing; per-feature inputs need "
                                f"all of {', '.join(names)}")
        columns = [by_name[f] for f in names]
        instances = [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]
        field = lambda r, f: f"input {f!r} [{r}]"  # noqa: E731
    if offset != len(tail):
        raise ProtocolError(400, f"the body holds {len(tail) - offset} bytes of binary data "
                            "that no input's binary_data_size accounts for")
    return _validate(instances, bundle, max_rows, field)


def _check_rows(n: int, label: str, max_rows: int) -> None:
    if n < 1:
        raise ProtocolError(400, f"{label}: shape has 0 rows; at least 1 is needed")
    if n > max_rows:
        raise ProtocolError(413, f"{label}: {n} rows; at most {max_rows} are accepted per request")


def infer_response(bundle: Bundle, probabilities: list[float], outputs: list[tuple[str, bool]],
                   request_id: str | None) -> Response:
    """The V2 response: the requested outputs as JSON data or binary tensor data."""
    threshold = bundle.threshold
    body: dict[str, Any] = {"model_name": model_name(bundle), "model_version": bundle.version}
    if request_id is not None:
        body["id"] = request_id
    tensors, blobs = [], []
    for oname, binary in outputs:
        datatype, dtype = OUTPUTS[oname]
        values = probabilities if oname == "probability" else \
            [int(p >= threshold) for p in probabilities]
        tensor: dict[str, Any] = {"name": oname, "datatype": datatype, "shape": [len(values)]}
        if binary:
            raw = np.asarray(values, dtype=dtype).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = values
        tensors.append(tensor)
    body["outputs"] = tensors
    if not blobs:
        return jsonify(body)
    header = json.dumps(body, separators=(",", ":")).encode()
    return Response(header + b"".join(blobs), 200, {HEADER_LENGTH: str(len(header))},
                    content_type="application/octet-stream")


# --- TF Serving / KServe V1 -----------------------------------------------------------------

@v1.get("/models/<name>")
def v1_model(name: str):
    """KServe V1's model status ``{"name", "ready"}`` (200, or 503 when the /readyz checks
    fail, as KServe's own server and its REST client expect), plus TF Serving's
    ``model_version_status`` for TF Serving clients."""
    if name.endswith(":predict"):  # the string converter also takes "<name>:predict"
        return jsonify({"error": f"GET is not allowed on {request.path}; use POST"}), 405, {
            "Allow": "POST"}
    bundle = _bundle_for(name)
    ready, status = _ready()
    state = "AVAILABLE" if ready else "UNAVAILABLE"
    error = {"error_code": "OK", "error_message": ""} if ready else \
        {"error_code": "UNAVAILABLE", "error_message": "the /readyz checks fail"}
    return jsonify({"name": model_name(bundle), "ready": ready,
                    "model_version_status": [{"version": bundle.version, "state": state,
                                              "status": error}]}), status


@v1.post("/models/<name>:predict")
def v1_predict(name: str):
    """``{"instances": [row, ...]}``, each row an object of the features or a list of 7 numbers
    in feature order → ``{"predictions": [{"probability", "label"}, ...]}``."""
    bundle = _bundle_for(name)
    config = _state()["config"]
    names = bundle.feature_names
    payload, tail = _read_json_body(config.max_batch_rows, len(names), rows_prescan=True)
    if tail:
        raise ProtocolError(400, f"{HEADER_LENGTH} is not part of the V1 protocol")
    rows = predict_rows(payload, bundle, config.max_batch_rows)
    probabilities, _sha = _state()["client"].predict(rows)
    threshold = bundle.threshold
    return jsonify({"predictions": [{"probability": p, "label": int(p >= threshold)}
                                    for p in probabilities]})


def predict_rows(payload: Any, bundle: Bundle, max_rows: int) -> list[list[float]]:
    """Rows of a V1 ``{"instances": [...]}`` body (objects, or lists in feature order)."""
    names = bundle.feature_names
    if not isinstance(payload, dict):
        raise ProtocolError(400, "the request must be a JSON object with 'instances'")
    extra = sorted(set(payload) - {"instances", "signature_name"})
    if extra:
        raise ProtocolError(400, f"unknown request field {extra[0]!r}; expected 'instances' "
                            "(the columnar 'inputs' form is not supported)")
    if payload.get("signature_name", "serving_default") != "serving_default":
        raise ProtocolError(400, f"unknown signature_name {payload['signature_name']!r}; the "
                            "model has 'serving_default'")
    instances = payload.get("instances")
    if isinstance(instances, list):
        converted = []
        for i, row in enumerate(instances):
            if isinstance(row, list):
                if len(row) != len(names):
                    raise ProtocolError(400, f"instances[{i}]: {len(row)} values; a list row holds "
                                        f"{len(names)}: {', '.join(names)}")
                row = dict(zip(names, row, strict=True))
            converted.append(row)
        instances = converted
    return validate_instances({"instances": instances}, bundle.metadata["features"], max_rows)
