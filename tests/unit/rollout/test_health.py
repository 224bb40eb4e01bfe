"""The health gate's HTTP checks against real (tiny) HTTP servers on loopback.

I8: check_front compares /version's identity (the image's RELEASE.json) with the image's
properties. I7: check_workers waits until every worker instance is seen on the front's broker
with the release's model sha256. Then both against the real Flask app.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rollout import health
from rollout.clouds.base import Release
from rollout.errors import HealthCheckFailed
from rollout.retry import NotReady
from tests.unit.rollout.fakecloud import serve

SHA = "a" * 64
BAKED = Release("img", "modelserve-r1", "r1", SHA, 0.79, git_sha="g1", app_version="0.1.0",
                built_at="2026-11-26T06:30:00Z", provenance="release", accuracy_floor=0.72)
STANDIN = Release("img", "modelserve-s1", "s1", SHA, 0.78, git_sha="standin",
                  provenance="standin")
IMAGE = {"release": "r1", "git_sha": "g1", "model_sha256": SHA, "app_version": "0.1.0",
         "built_at": "2026-11-26T06:30:00Z", "provenance": "release"}


def version_body(**over) -> dict:
    body = {"release": "r1", "seed_release": "r1", "colour": "green", "role": "front",
            "deploy_id": "d1", "env": "dev", "git_sha": "g1", "model_sha256": SHA,
            "image": dict(IMAGE)}
    body.update(over)
    return body


@contextmanager
def server(routes: dict[tuple[str, str], tuple[int, object]]) -> Iterator[tuple[str, int]]:
    """A threaded HTTP server answering ``routes[(method, path)] = (status, json body)``;
    the requests it saw are in ``calls``."""
    calls: list[tuple[str, str]] = []

    def route(method: str, path: str):
        calls.append((method, path))
        return routes.get((method, path), (404, {"error": "not found"}))

    srv = serve("127.0.0.1", 0, route)
    srv.calls = calls  # type: ignore[attr-defined]
    try:
        yield srv.server_address[0], srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def front_routes(version: dict, sha: str = SHA, ready: int = 200) -> dict:
    return {("GET", "/readyz"): (ready, {"status": "ready" if ready == 200 else "unavailable"}),
            ("GET", "/version"): (200, version),
            ("POST", "/api/v1/predictions"): (200, {
                "predictions": [{"probability": 0.3, "label": 0}],
                "model": {"version": "1", "sha256": sha}})}


def check(version: dict, release: Release | str = BAKED, **kw):
    with server(front_routes(version, kw.pop("served", SHA), kw.pop("ready", 200))) as (a, p):
        return health.check_front(a, port=p, release=release, **kw)


# -- I8: identity from the image --------------------------------------------------------------
def test_baked_image_whose_release_json_matches_its_properties_passes():
    v = check(version_body(), deploy_id="d1", colour="green")
    assert v["image"]["git_sha"] == "g1"


@pytest.mark.parametrize("field,value,words", [
    ("git_sha", "other", "git_sha 'other'"),
    ("release", "r0", "release 'r0'"),
    ("model_sha256", "b" * 64, "image model_sha256"),
])
def test_release_json_disagreeing_with_the_properties_is_refused(field, value, words):
    body = version_body(image={**IMAGE, field: value})
    with pytest.raises(HealthCheckFailed, match="not what its properties claim") as err:
        check(body)
    assert words in str(err.value)


def test_a_baked_release_without_release_json_is_refused():
    with pytest.raises(HealthCheckFailed, match="no RELEASE.json"):
        check(version_body(image=None, git_sha=None))


def test_the_seed_alone_cannot_make_an_image_pass():
    # the seed says r1 and the app echoes it, but the image holds r0
    body = version_body(release="r0", image={**IMAGE, "release": "r0"})
    with pytest.raises(HealthCheckFailed, match="release 'r0'"):
        check(body)


def test_seeded_for_another_release():
    with pytest.raises(HealthCheckFailed, match="seeded for release 'r9'"):
        check(version_body(seed_release="r9"))


def test_standin_without_release_json_is_checked_on_release_and_sha():
    body = {"release": "s1", "deploy_id": "d1", "model_sha256": SHA}
    assert check(body, STANDIN, deploy_id="d1")["release"] == "s1"
    with pytest.raises(HealthCheckFailed, match="model_sha256"):
        check({**body, "model_sha256": "c" * 64}, STANDIN)


def test_old_callers_passing_a_name_still_work():
    assert check(version_body(), "r1", model_sha256=SHA)["release"] == "r1"


def test_seed_checks_deploy_and_colour():
    with pytest.raises(HealthCheckFailed, match="deploy 'd1', expected 'd2'"):
        check(version_body(), deploy_id="d2")
    with pytest.raises(HealthCheckFailed, match="colour green, expected blue"):
        check(version_body(), colour="blue")


def test_served_model_must_be_the_images():
    with pytest.raises(HealthCheckFailed, match="refusing to switch"):
        check(version_body(), served="d" * 64)


def test_not_ready_is_retryable():
    with pytest.raises(NotReady, match="/readyz 503"):
        check(version_body(), ready=503)
    with server({}) as (a, p):
        pass  # closed now: connection refused
    with pytest.raises(NotReady):
        health.check_front(a, port=p, release=BAKED)


# -- I7: workers gated -----------------------------------------------------------------------
def workers_routes(entries, status=200) -> dict:
    return {("GET", "/api/v1/workers"): (status, {"model_sha256": SHA, "workers": entries})}


def entry(instance: str, sha: str = SHA, node: str | None = None) -> dict:
    return {"node": node or f"modelserve-worker-1@{instance}", "instance": instance,
            "role": "worker", "model_sha256": sha}


def test_no_worker_instances_needs_no_call():
    with server({}) as (a, p):
        assert health.check_workers(a, p, (), SHA) == []


def test_every_named_worker_seen_with_the_right_model():
    names = ("ms-dev-r1-worker1-abc", "ms-dev-r1-worker2-abc")
    found = [entry("ms-dev-r1-front0-abc"), entry(names[0]),
             entry("", node=f"modelserve-worker-7@{names[1]}.novalocal")]
    with server(workers_routes(found)) as (a, p):
        seen = health.check_workers(a, p, names, SHA, front="front0")
    assert len(seen) == 2


def test_a_worker_not_yet_seen_is_not_ready():
    with server(workers_routes([entry("ms-dev-r1-worker1-abc")])) as (a, p):
        with pytest.raises(NotReady, match="ms-dev-r1-worker2-abc"):
            health.check_workers(a, p, ("ms-dev-r1-worker1-abc", "ms-dev-r1-worker2-abc"), SHA)


def test_a_worker_with_another_model_fails_at_once():
    with server(workers_routes([entry("w1", sha="e" * 64)])) as (a, p):
        with pytest.raises(HealthCheckFailed, match="worker w1 serves model sha256 eeeeeeeeeeee"):
            health.check_workers(a, p, ("w1",), SHA)


def test_a_name_prefix_is_not_a_match():
    with server(workers_routes([entry("w10")])) as (a, p):
        with pytest.raises(NotReady, match="w1"):
            health.check_workers(a, p, ("w1",), SHA)


def test_front_without_the_endpoint_or_broker():
    with server({}) as (a, p):
        with pytest.raises(HealthCheckFailed, match="404"):
            health.check_workers(a, p, ("w1",), SHA)
    with server(workers_routes([], status=503)) as (a, p):
        with pytest.raises(NotReady, match="503"):
            health.check_workers(a, p, ("w1",), SHA)


# -- both against the real Flask app ----------------------------------------------------------
class StubClient:
    """0.25 for any row but the bundle's smoke row (its own probability: /readyz passes)."""

    def __init__(self, sha: str, workers: list[dict], smoke: dict | None = None):
        self.sha, self._workers, self.smoke = sha, workers, smoke or {}

    def predict(self, rows, timeout=None):
        return [self.smoke.get(tuple(r), 0.25) for r in rows], self.sha

    def check_broker(self):
        pass

    def workers(self):
        return self._workers

    def queue_depth(self):
        return 0


@contextmanager
def real_app(tmp_path, bundle, image: dict | None, workers: list[dict]):
    from werkzeug.serving import make_server

    from app.config import load_config
    from app.web import create_app

    release_file = tmp_path / "RELEASE.json"
    if image is not None:
        release_file.write_text(json.dumps(image))
    cfg = load_config({"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/ms",
                       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
                       "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_RELEASE": "r1",
                       "MODELSERVE_COLOUR": "blue", "MODELSERVE_DEPLOY_ID": "d1",
                       "MODELSERVE_RELEASE_FILE": str(release_file)})
    first = bundle.metadata["holdout_sample"][0]
    smoke = {tuple(float(first["features"][n]) for n in bundle.feature_names): first["probability"]}
    app = create_app(cfg, bundle, client=StubClient(bundle.sha256, workers, smoke))
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        yield "127.0.0.1", srv.server_port
    finally:
        srv.shutdown()
        t.join(5)


def test_gate_against_the_real_app(tmp_path, bundle):
    image = {**IMAGE, "model_sha256": bundle.sha256}
    rel = Release("img", "modelserve-r1", "r1", bundle.sha256, 0.79, git_sha="g1",
                  provenance="release")
    wk = [entry("ms-dev-r1-worker1-d1", sha=bundle.sha256)]
    with real_app(tmp_path, bundle, image, wk) as (a, p):
        v = health.check_front(a, port=p, release=rel, deploy_id="d1", colour="blue")
        assert v["image"]["release"] == "r1" and v["git_sha"] == "g1"
        assert health.check_workers(a, p, ("ms-dev-r1-worker1-d1",), bundle.sha256)
        with pytest.raises(HealthCheckFailed, match="git_sha"):
            health.check_front(a, port=p, release=Release(
                "img", "modelserve-r1", "r1", bundle.sha256, git_sha="g2", provenance="release"))


def test_gate_against_a_checkout_app_without_release_json(tmp_path, bundle):
    rel = Release("img", "modelserve-r1", "r1", bundle.sha256, 0.79, git_sha="g1",
                  provenance="release")
    with real_app(tmp_path, bundle, None, [entry("w1", sha=bundle.sha256)]) as (a, p):
        assert health.fetch_version(a, p)["image"] is None
        with pytest.raises(HealthCheckFailed, match="no RELEASE.json"):
            health.check_front(a, port=p, release=rel)
