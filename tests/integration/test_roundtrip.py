"""HTTP → RabbitMQ → Celery worker → model → HTTP, against the real services."""

import concurrent.futures
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def post(stack, instances, **params):
    return requests.post(stack.url + "/api/v1/predictions", json={"instances": instances},
                         params=params, timeout=30)


def test_whole_holdout_matches_the_bundles_own_predictions(stack, bundle, holdout):
    instances, expected = holdout
    r = post(stack, instances)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"version": bundle.version, "sha256": bundle.sha256}
    got = [p["probability"] for p in body["predictions"]]
    assert got == pytest.approx(expected, abs=2e-6)
    labels = [s["predicted"] for s in bundle.metadata["holdout_sample"]]
    assert [p["label"] for p in body["predictions"]] == labels


def test_async_prediction_is_accepted_then_fetched(stack, holdout):
    instances, expected = holdout
    r = post(stack, instances[:25], **{"async": "true"})
    assert r.status_code == 202, r.text
    url = stack.url + r.json()["status_url"]
    assert r.headers["Location"] == r.json()["status_url"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = requests.get(url, timeout=10).json()
        if status["state"] == "SUCCESS":
            break
        time.sleep(0.1)
    assert status["state"] == "SUCCESS", status
    assert [p["probability"] for p in status["predictions"]] == pytest.approx(expected[:25], abs=2e-6)


def test_unknown_task_id_is_404(stack):
    r = requests.get(stack.url + "/api/v1/tasks/00000000-0000-4000-8000-000000000000", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["field"] == "task_id"


def test_readyz_names_every_check(stack, bundle):
    last: list = [None]

    def fresh_ready():
        # from the diagnostics snapshot, refreshed about every second; age_s: its age
        r = requests.get(stack.url + "/readyz", timeout=15)
        last[0] = (r.status_code, r.json())
        return last[0][1] if r.status_code == 200 else None

    body = wait_for(fresh_ready, 60, "/readyz answering 200 with every check",
                    interval=0.3, detail=lambda: f"last answer {last[0]}")
    assert body["status"] == "ready" and "cached" not in body
    assert 0 <= body["age_s"] < 15
    assert set(body["checks"]) == {"broker", "workers", "model", "smoke_prediction"}
    assert bundle.sha256[:12] in body["checks"]["model"]


def test_version_reports_the_instance_config(stack, bundle):
    v = requests.get(stack.url + "/version", timeout=10).json()
    assert (v["release"], v["colour"], v["deploy_id"]) == ("test-r1", "blue", "d-test")
    assert v["model_sha256"] == bundle.sha256


def test_concurrent_requests_each_get_their_own_rows(stack, holdout):
    """64 clients at once: batching must never hand one request another's answers."""
    instances, expected = holdout

    def one(i):
        rows = instances[i % 300: i % 300 + 1 + i % 5]
        r = post(stack, rows)
        assert r.status_code == 200, r.text
        return [p["probability"] for p in r.json()["predictions"]], expected[i % 300: i % 300 + 1 + i % 5]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        for got, want in pool.map(one, range(640)):
            assert got == pytest.approx(want, abs=2e-6)
    text = requests.get(stack.url + "/metrics", timeout=10).text
    # Some tasks carried more than one request's rows: the micro-batcher did batch.
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples["modelserve_task_duration_seconds_count"] < samples["modelserve_predicted_rows_total"]


def test_client_thread_churn(stack, holdout):
    """Short-lived client threads, each on a new connection: every answer right, none lost."""
    instances, expected = holdout
    errors: list[str] = []

    def one(i):
        try:
            with requests.Session() as s:
                r = s.post(stack.url + "/api/v1/predictions", json={"instances": [instances[i]]},
                           params={"async": "true"} if i % 3 == 0 else {}, timeout=30)
                if r.status_code == 202:
                    url = stack.url + r.json()["status_url"]
                    for _ in range(300):
                        body = s.get(url, timeout=10).json()
                        if body["state"] == "SUCCESS":
                            break
                        time.sleep(0.05)
                else:
                    body = r.json()
                p = body["predictions"][0]["probability"]
                if abs(p - expected[i]) > 2e-6:
                    errors.append(f"row {i}: {p} != {expected[i]}")
        except Exception as exc:  # collected, asserted below
            errors.append(f"row {i}: {exc!r}")

    for wave in range(6):
        threads = [threading.Thread(target=one, args=(wave * 50 + j,)) for j in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []


def test_broker_client_under_thread_churn(stack, holdout):
    """The result backend used directly from many short-lived threads (docs/design.md: rpc://
    broke here): sync waits and async lookups all resolve correctly."""
    from app.client import BrokerClient
    from app.config import load_config

    instances, expected = holdout
    cfg = load_config(stack.env)
    client = BrokerClient(cfg)
    rows = [[float(r[n]) for n in ("npreg", "glu", "bp", "skin", "bmi", "ped", "age")]
            for r in instances]
    results: dict[int, float] = {}
    errors: list[str] = []

    def one(i):
        try:
            if i % 2:
                probs, _ = client.predict([rows[i]])
                results[i] = probs[0]
            else:
                task_id = client.submit_async([rows[i]])
                for _ in range(400):
                    st = client.task_status(task_id)
                    if st and st["state"] == "SUCCESS":
                        results[i] = st["result"]["probabilities"][0]
                        return
                    time.sleep(0.025)
                errors.append(f"task {task_id} for row {i} not done: {st}")
        except Exception as exc:
            errors.append(f"row {i}: {exc!r}")

    try:
        for wave in range(4):
            threads = [threading.Thread(target=one, args=(wave * 60 + j,)) for j in range(60)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
    finally:
        client.close()
    assert errors == []
    assert len(results) == 240
    for i, p in results.items():
        assert abs(p - expected[i]) < 2e-6


def test_oversized_body_is_413_json(stack):
    big = b'{"instances": [' + b" " * (4 * 1024 * 1024 + 10) + b"]}"
    r = requests.post(stack.url + "/api/v1/predictions", data=big,
                      headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["error"]["rule"] == "max_bytes"


def test_full_batch_of_max_rows(stack, holdout):
    instances, expected = holdout
    rows = (instances * 31)[:10_000]
    r = post(stack, rows)
    assert r.status_code == 200, r.text[:300]
    got = [p["probability"] for p in r.json()["predictions"]]
    assert len(got) == 10_000
    assert got[:332] == pytest.approx(expected, abs=2e-6)
    assert post(stack, rows + rows[:1]).status_code == 413
