"""The diagnostics snapshot (app.diagnostics) with stand-in clients: request threads
never call the client; one refresher thread per app does; readiness keeps its checks and
names the failed one; a stuck refresher makes readiness 503 "snapshot", never a stale 200.
The real broker path (no deadlock under many callers) is tests/integration/test_diagnostics.py."""

from __future__ import annotations

import threading
import time

import pytest

from app.client import BrokerClient
from app.config import load_config
from app.dispatch import Unavailable
from app.web import create_app
from tests.waiting import wait_for

CFG = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/modelserve",
       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
       "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_RELEASE": "r7",
       "MODELSERVE_COLOUR": "green"}
REFRESHER = "modelserve-diagnostics"


class Fake:
    """A client whose answers the test sets; records which threads called it; `gate` (an
    Event) blocks check_broker until set."""

    def __init__(self, bundle):
        first = bundle.metadata["holdout_sample"][0]
        self.smoke = tuple(float(first["features"][n]) for n in bundle.feature_names)
        self.probability, self.sha = first["probability"], bundle.sha256
        self.broker_error: Exception | None = None
        self.worker_list = [{"node": "w@a", "instance": "a", "role": "worker",
                             "model_sha256": bundle.sha256}]
        self.callers: set[str] = set()
        self.refreshes = 0
        self.gate = threading.Event()
        self.gate.set()
        self.hooks: list = []

    def on_close(self, hook):
        self.hooks.append(hook)

    def close(self):
        for hook in self.hooks:
            hook()

    def _called(self):
        self.callers.add(threading.current_thread().name)

    def check_broker(self):
        self._called()
        self.gate.wait()
        self.refreshes += 1
        if self.broker_error is not None:
            raise self.broker_error

    def workers(self):
        self._called()
        return self.worker_list

    def predict(self, rows, timeout=None):
        self._called()
        assert timeout is not None and timeout <= 10, "the smoke prediction is bounded"
        return [self.probability if tuple(r) == self.smoke else 0.5 for r in rows], self.sha

    def queue_depth(self):
        self._called()
        return 4


@pytest.fixture
def app(bundle):
    fake = Fake(bundle)
    app = create_app(load_config(CFG), bundle, client=fake)
    diag = app.extensions["modelserve"]["diagnostics"]
    diag.interval = 0.05
    app.fake, app.diag = fake, diag
    yield app
    fake.close()


def fresh(app, count: int = 2) -> None:
    """Wait until the refresher has run `count` more refreshes (the fake's answers changed)."""
    target = app.fake.refreshes + count
    wait_for(lambda: app.fake.refreshes >= target, 10, "the refresher to run again")


def test_ready_answers_from_the_snapshot_with_its_age(app):
    c = app.test_client()
    r = c.get("/readyz")
    assert r.status_code == 200, r.json
    assert r.json["status"] == "ready" and "cached" not in r.json
    assert set(r.json["checks"]) == {"broker", "workers", "model", "smoke_prediction"}
    assert r.json["checks"]["workers"] == "1 answering"
    assert 0 <= r.json["age_s"] < 5
    assert c.get("/v2/health/ready").json == {"ready": True}
    w = c.get("/api/v1/workers")
    assert w.status_code == 200 and w.json["workers"] == app.fake.worker_list
    assert "modelserve_queue_depth 4.0" in c.get("/metrics").get_data(as_text=True)


def test_request_threads_never_call_the_client(app):
    c = app.test_client()
    errors: list = []

    def poll():
        try:
            for path in ("/readyz", "/api/v1/workers", "/metrics", "/v2/health/ready") * 10:
                c.get(path)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert app.fake.callers == {REFRESHER}
    refreshers = [t for t in threading.enumerate() if t.name == REFRESHER and t.is_alive()]
    assert app.diag.running and app.diag._thread.daemon
    assert app.diag._thread in refreshers


@pytest.mark.parametrize("change, failed", [
    (lambda f: setattr(f, "broker_error", Unavailable("broker unreachable: refused")), "broker"),
    (lambda f: setattr(f, "worker_list", []), "workers"),
    (lambda f: setattr(f, "sha", "b" * 64), "model"),
    (lambda f: setattr(f, "probability", 0.999), "smoke_prediction"),
])
def test_not_ready_names_the_failed_check(app, change, failed):
    c = app.test_client()
    assert c.get("/readyz").status_code == 200
    change(app.fake)
    fresh(app)
    r = c.get("/readyz")
    assert r.status_code == 503
    assert r.json["status"] == "unavailable" and r.json["failed"] == failed
    assert failed in r.json["checks"] and "age_s" in r.json
    assert c.get("/v2/health/ready").status_code == 503


def test_broker_down_makes_workers_503_and_depth_unknown(app):
    c = app.test_client()
    assert c.get("/api/v1/workers").status_code == 200
    app.fake.broker_error = Unavailable("broker unreachable: refused")
    fresh(app)
    r = c.get("/api/v1/workers")
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert "unreachable" in r.json["error"]["message"]
    assert "modelserve_queue_depth -1.0" in c.get("/metrics").get_data(as_text=True)


def test_a_stuck_refresher_gives_503_snapshot_at_once_never_a_stale_200(app):
    c = app.test_client()
    assert c.get("/readyz").status_code == 200
    app.diag.stale_after = 0.5
    app.fake.gate.clear()  # the next refresh hangs in check_broker
    try:
        time.sleep(0.7)
        started = time.monotonic()
        r = c.get("/readyz")
        assert time.monotonic() - started < 0.5, "a reader never waits on the refresher"
        assert r.status_code == 503 and r.json["failed"] == "snapshot", r.json
        assert "stuck" in r.json["checks"]["snapshot"] and r.json["age_s"] > 0.5
        assert c.get("/v2/health/ready").status_code == 503
        assert c.get("/api/v1/workers").status_code == 503
        assert "modelserve_queue_depth -1.0" in c.get("/metrics").get_data(as_text=True)
    finally:
        app.fake.gate.set()
    wait_for(lambda: c.get("/readyz").status_code == 200, 10, "ready again once unstuck")


def test_no_snapshot_within_the_first_wait_is_503_snapshot(bundle):
    fake = Fake(bundle)
    fake.gate.clear()
    app = create_app(load_config(CFG), bundle, client=fake)
    app.extensions["modelserve"]["diagnostics"].first_wait = 0.2
    try:
        r = app.test_client().get("/readyz")
        assert r.status_code == 503 and r.json["failed"] == "snapshot"
    finally:
        fake.gate.set()
        fake.close()


def test_the_refresher_starts_once_and_stops_with_the_client(app):
    c = app.test_client()
    assert not app.diag.running  # lazily: nothing runs before a diagnostic is asked for
    c.get("/readyz")
    thread = app.diag._thread
    c.get("/api/v1/workers")
    assert app.diag._thread is thread and thread.daemon
    app.fake.close()
    assert not thread.is_alive()
    app.diag.start()  # stopped for good
    assert app.diag._thread is thread and not app.diag.running


def test_broker_client_diagnostics_are_bounded_and_never_use_the_pool():
    """The real BrokerClient (no broker on port 1): a diagnostic waiting for the diagnostics
    connection gives up with Unavailable; one that cannot reach the broker fails within its
    bound; neither takes anything from Celery's pools."""
    client = BrokerClient(load_config(CFG))
    try:
        assert client._diag_lock.acquire(timeout=1)
        try:
            for call in (client.workers, client.check_workers, client.check_broker):
                started = time.monotonic()
                with pytest.raises(Unavailable, match="another broker diagnostic"):
                    call(wait=0.2)
                assert time.monotonic() - started < 1
            assert client.queue_depth(wait=0.2) is None
        finally:
            client._diag_lock.release()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="unreachable"):
            client.workers()
        with pytest.raises(Unavailable, match="unreachable"):
            client.check_broker()
        assert time.monotonic() - started < 15
        assert client.celery._pool is None, "a diagnostic used Celery's connection pool"
    finally:
        client.close()
