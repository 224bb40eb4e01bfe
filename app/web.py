"""Flask app factory: the model page, the prediction API, health, version and metrics.

The web process never imports TensorFlow: predictions go through `BrokerClient` (RabbitMQ →
Celery worker) and everything shown about the model comes from the bundle's metadata.
"""

from __future__ import annotations

import re
import time
from typing import Any

from flask import Blueprint, Flask, current_app, g, jsonify, render_template, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from app import __version__, charts
from app.bundle import Bundle, load_bundle
from app.config import Config, load_config
from app.diagnostics import Diagnostics
from app.dispatch import Unavailable
from app.identity import IDENTITY_KEYS, read_release_file
from app.limits import AsyncBusy, ByteBudget
from app.metrics import Metrics
from app.protocols import register_protocols
from app.schema import ValidationError, parse_json, validate_instances

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

api = Blueprint("api", __name__)
pages = Blueprint("pages", __name__)


def _state() -> dict[str, Any]:
    return current_app.extensions["modelserve"]


def _error(status: int, type_: str, message: str, **extra: Any):
    return jsonify({"error": {"type": type_, "message": message, **extra}}), status


def _format(probabilities: list[float], sha256: str, bundle: Bundle) -> dict[str, Any]:
    threshold = bundle.threshold
    return {
        "predictions": [{"probability": round(p, 6), "label": int(p >= threshold)}
                        for p in probabilities],
        "model": {"version": bundle.version, "sha256": sha256},
    }


@api.post("/api/v1/predictions")
def predictions():
    """Score 1..max rows; 200 with predictions, or 202 + task URL with ?async=true."""
    state = _state()
    bundle = state["bundle"]
    mode = request.args.get("async", "false").lower()
    if mode not in ("true", "false", "1", "0"):
        raise ValidationError("async", "boolean", "async must be true or false")
    unknown = sorted(set(request.args) - {"async"})
    if unknown:
        raise ValidationError(unknown[0], "unknown_parameter", f"unknown query parameter {unknown[0]!r}")
    client = state["client"]
    if mode in ("true", "1"):
        # admission first: beyond MODELSERVE_ASYNC_INFLIGHT async requests at once, 429 before
        # the body is parsed, so a flood of them cannot take the threads sync requests need
        with client.async_admission():
            rows = _rows(state)
            task_id = client.submit_async(rows)
        url = f"/api/v1/tasks/{task_id}"
        return jsonify({"task_id": task_id, "status_url": url, "rows": len(rows)}), 202, {
            "Location": url}
    probabilities, sha256 = client.predict(_rows(state))
    return jsonify(_format(probabilities, sha256, bundle))


def _rows(state: dict[str, Any]) -> list[list[float]]:
    """The request's validated rows. Bounded: bytes parsed at once (503 beyond), rows and depth
    pre-scanned before json.loads."""
    config, features = state["config"], state["bundle"].metadata["features"]
    with state["parse_budget"].hold(request.content_length or config.max_body_bytes):
        payload = parse_json(request.get_data(cache=False), request.content_type,
                             max_rows=config.max_batch_rows, features=len(features))
        return validate_instances(payload, features, config.max_batch_rows)


@api.get("/api/v1/tasks/<task_id>")
def task(task_id: str):
    """Status of an async prediction; the predictions once it has succeeded."""
    if not _UUID.match(task_id):
        raise ValidationError("task_id", "uuid", "task_id must be a lowercase UUID", status=404)
    status = _state()["client"].task_status(task_id)
    if status is None:
        return _error(404, "not_found", f"no task {task_id} (unknown, or its result expired)",
                      field="task_id")
    body: dict[str, Any] = {"task_id": task_id, "state": status["state"]}
    if "result" in status:
        res = status["result"]
        body.update(_format(res["probabilities"], res["sha256"], _state()["bundle"]))
    if "error" in status:
        body["error"] = status["error"]
    return jsonify(body)


@api.get("/api/v1/model")
def model():
    """The bundle's metadata (without the held-out sample)."""
    return jsonify(_state()["bundle"].public_metadata())


@api.get("/api/v1/model/holdout")
def holdout():
    """The bundle's held-out sample as request rows (feature dicts, in the bundle's order):
    what ``rollout deploy``'s model-diff gate sends to the live and the new release."""
    bundle = _state()["bundle"]
    rows = [{n: row["features"][n] for n in bundle.feature_names}
            for row in bundle.metadata.get("holdout_sample") or []]
    return jsonify({"rows": rows, "version": bundle.version, "sha256": bundle.sha256})


@api.get("/healthz")
def healthz():
    """The process is alive."""
    return jsonify({"status": "ok"})


@api.get("/readyz")
def readyz():
    """Broker reachable, a worker answers, the model is loaded and a smoke prediction is right:
    as the diagnostics snapshot last saw it (app.diagnostics; `age_s`: its age). Never talks
    to the broker itself; a snapshot too old (the refresher stuck) fails as "snapshot"."""
    body, status = _state()["diagnostics"].readiness()
    return jsonify(body), status


@api.get("/version")
def version():
    """Release, colour, role and model identity of this instance.

    Release, git sha, app version and built_at come from the image's RELEASE.json (what was
    baked); colour, role, deploy id and env from the seed. Without RELEASE.json (a checkout)
    they fall back to the config and ``image`` is null.
    """
    state = _state()
    bundle: Bundle = state["bundle"]
    config: Config = state["config"]
    image, problem = state["image"]
    body = {**config.public(), "seed_release": config.release, "app_version": __version__,
            "git_sha": None, "built_at": None, "model_version": bundle.version,
            "model_sha256": bundle.sha256, "image": image}
    if image is not None:
        body.update({k: image[k] for k in IDENTITY_KEYS if k != "model_sha256"})
        body["image_model_sha256"] = image["model_sha256"]
    if problem:
        body["image_error"] = problem
    return jsonify(body)


@api.get("/api/v1/workers")
def workers():
    """The Celery workers on this front's broker that answer now, each with the model sha256
    it serves (hostnames and hashes only; no credentials), from the diagnostics snapshot
    (`age_s`: its age). 503 when its last refresh could not reach them (broker down)."""
    state = _state()
    found, age = state["diagnostics"].workers()  # Unavailable: 503 (the error handler)
    return jsonify({"model_sha256": state["bundle"].sha256, "workers": found, "age_s": age})


@api.get("/metrics")
def metrics():
    """Prometheus exposition."""
    state = _state()
    depth = state["diagnostics"].queue_depth()  # the snapshot's; -1 when unknown
    state["metrics"].queue_depth.set(-1 if depth is None else depth)
    return state["metrics"].exposition(), 200, {"Content-Type": CONTENT_TYPE_LATEST}


def _charts() -> charts.Charts:
    """The page's figures and SVGs, computed once per process from the bundle's held-out rows
    (two threads racing here both compute the same value; one wins)."""
    state = _state()
    if "charts" not in state:
        bundle: Bundle = state["bundle"]
        state["charts"] = charts.build(bundle.metadata["holdout_sample"], bundle.threshold)
    return state["charts"]


@pages.route("/", methods=["GET", "POST"])
def index():
    """The model page: metrics, charts of the held-out predictions, the held-out table and a
    form to score one patient (server-side, no JavaScript); the score is marked on the
    distribution chart."""
    state = _state()
    bundle: Bundle = state["bundle"]
    result = error = None
    values: dict[str, str] = {}
    status = 200
    if request.method == "POST":
        values = {n: request.form.get(n, "").strip() for n in bundle.feature_names}
        try:
            row = {}
            for f in bundle.metadata["features"]:
                raw = values[f["name"]]
                try:
                    row[f["name"]] = float(raw) if raw else None
                except ValueError:
                    raise ValidationError(f["name"], "type", f"{f['name']} must be a number") from None
                if row[f["name"]] is None:
                    raise ValidationError(f["name"], "required", f"{f['name']} is required")
            rows = validate_instances({"instances": [row]}, bundle.metadata["features"], 1)
            probabilities, _ = state["client"].predict(rows)
            result = {"probability": probabilities[0], "label": int(probabilities[0] >= bundle.threshold)}
        except ValidationError as exc:
            # the form names the input, not the JSON path of the API (instances[0].glu -> glu)
            field = exc.field.removeprefix("instances[0].")
            error, status = {"field": field, "message": exc.message}, 400
        except Unavailable as exc:
            error, status = {"field": None, "message": f"prediction unavailable: {exc}"}, 503
    figures = _charts()
    distribution = figures.distribution(result["probability"] if result else None)
    return render_template("index.html", bundle=bundle, meta=bundle.metadata,
                           config=state["config"], result=result, error=error,
                           values=values, charts=figures, distribution=distribution), status


def create_app(config: Config | None = None, bundle: Bundle | None = None,
               client: Any = None) -> Flask:
    """Build the Flask app. `client` defaults to a BrokerClient on the configured broker."""
    config = config or load_config()
    bundle = bundle or load_bundle(config.bundle_dir or None, verify=False)
    metrics_ = Metrics()
    if client is None:
        from app.client import BrokerClient

        client = BrokerClient(config, observe=metrics_.observe_batch)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=config.max_body_bytes, JSON_SORT_KEYS=False)
    app.json.sort_keys = False
    app.extensions["modelserve"] = {"config": config, "bundle": bundle, "client": client,
                                    "metrics": metrics_,
                                    "parse_budget": ByteBudget(config.parse_bytes),
                                    # one refresher thread per app (= per web process),
                                    # started by the first diagnostic request
                                    "diagnostics": Diagnostics(client, bundle),
                                    "image": read_release_file(config.release_file)}
    app.register_blueprint(api)
    app.register_blueprint(pages)
    register_protocols(app)  # /v2 (Open Inference Protocol) and /v1 (TF Serving)

    @app.before_request
    def _start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def _count(response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics_.requests.labels(request.method, route, str(response.status_code)).inc()
        if "started" in g:
            metrics_.latency.labels(route).observe(time.perf_counter() - g.started)
        return response

    @app.errorhandler(ValidationError)
    def _invalid(exc: ValidationError):
        return jsonify(exc.to_dict()), exc.status

    @app.errorhandler(Unavailable)
    def _unavailable(exc: Unavailable):
        body, status = _error(503, "unavailable", str(exc))
        body.headers["Retry-After"] = "1"
        return body, status

    @app.errorhandler(AsyncBusy)
    def _async_busy(exc: AsyncBusy):
        body, status = _error(429, "too_many_requests", str(exc), rule="async_inflight",
                              limit=exc.limit)
        body.headers["Retry-After"] = "1"
        return body, status

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        return _error(413, "validation_error", f"request body exceeds {config.max_body_bytes} "
                      "bytes", field="body", rule="max_bytes")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return _error(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or "")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        app.logger.exception("unhandled error")
        return _error(500, "internal_error", "internal error; see the server log")

    return app
