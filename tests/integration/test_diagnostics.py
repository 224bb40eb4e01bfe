"""Diagnostics never wedge a front, on the real stack.

Were a request to broadcast to the workers itself, 24 clients looping on GET /readyz (or 64 on
/api/v1/workers) would wedge a front for good (they did at 9c4cdc3): each Celery broadcast held
a connection of the app's bounded pool (broker_pool_limit) while kombu's mailbox asked the
producer pool, backed by the same connections, for another.
With as many broadcasts at once as pool slots nobody could go on.

* The client: many threads (3x the pool limit) call the real BrokerClient's broadcast paths
  (workers(), check_workers()) and its publish path (predict) at once; every one must finish
  within a bound (a deadlock shows as threads still alive: the count is reported).
* The web: 48 clients looping on /readyz and /api/v1/workers for 10 s; a prediction and
  /healthz sent meanwhile and right after are answered within a few seconds.

To show a test fails on another version of the code (e.g. the one before the fix):
MODELSERVE_TEST_BROKER_CLIENT=<path of a client.py> makes the first test load BrokerClient
from that file; MODELSERVE_TEST_APP_ROOT=<dir holding an app/ package> makes the second run
its own web process from that dir (on the stack's broker, result store and worker).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from app.config import load_config
from app.dispatch import Unavailable
from devtools import services as svc
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

BOUND = 60.0  # every caller must be done within this (new code: about 15 s at most)
FLOOD_SECONDS = 10.0
FLOOD_CLIENTS = 48
ANSWER_WITHIN = 5.0  # a prediction or /healthz during or right after the flood


def broker_client_class():
    """app.client.BrokerClient, or the one in $MODELSERVE_TEST_BROKER_CLIENT."""
    path = os.environ.get("MODELSERVE_TEST_BROKER_CLIENT")
    if not path:
        from app.client import BrokerClient

        return BrokerClient
    spec = importlib.util.spec_from_file_location("modelserve_client_under_test", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BrokerClient


def _close_bounded(client, timeout: float = 15.0) -> None:
    """client.close() in a daemon thread: a deadlocked client must not hang the session."""
    t = threading.Thread(target=client.close, name="close-client", daemon=True)
    t.start()
    t.join(timeout)


def test_broadcasts_and_publishes_from_3x_the_pool_limit_threads_all_finish(stack, bundle):
    client = broker_client_class()(load_config(stack.env))
    limit = int(client.celery.conf.broker_pool_limit)
    assert limit == 10, "app/celery_app.py leaves Celery's default pool limit (10)"
    n = 3 * limit
    first = bundle.metadata["holdout_sample"][0]
    row = [float(first["features"][f]) for f in bundle.feature_names]
    calls = {"workers": lambda: client.workers(),
             "check_workers": lambda: client.check_workers(),
             "predict": lambda: client.predict([row])}
    roles = [("workers", "check_workers", "predict")[i % 3] for i in range(n)]
    outcomes: dict[int, list] = {i: [] for i in range(n)}
    start = threading.Barrier(n + 1)

    def run(i: int) -> None:
        start.wait(30)  # all at once: the pool is asked for n connections together
        for _ in range(2):
            try:
                outcomes[i].append(("ok", calls[roles[i]]()))
            except Unavailable as exc:  # allowed: a diagnostic that could not go now
                outcomes[i].append(("unavailable", str(exc)))
            except Exception as exc:  # noqa: BLE001 - reported below
                outcomes[i].append(("error", repr(exc)))

    threads = [threading.Thread(target=run, args=(i,), name=f"diag-{roles[i]}-{i}", daemon=True)
               for i in range(n)]
    try:
        for t in threads:
            t.start()
        start.wait(30)
        began = time.monotonic()
        deadline = began + BOUND
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - began
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, (
            f"{len(alive)} of {n} threads still blocked after {BOUND:.0f} s (deadlock on "
            f"Celery's connection/producer pool): {sorted(alive)}")

        def answered():
            try:
                return client.workers()
            except Unavailable:
                return None

        # once the storm is over the same client still broadcasts, and right
        after = wait_for(answered, 60, "a workers() broadcast answering after the storm")
        assert all(w["model_sha256"] == bundle.sha256 for w in after), after
    finally:
        if any(t.is_alive() for t in threads):
            _close_bounded(client)  # leaves the blocked (daemon) threads behind
        else:
            client.close()
    errors = [(roles[i], o) for i, got in outcomes.items() for o in got if o[0] == "error"]
    assert not errors, errors
    by_role: dict[str, list] = {}
    for i, got in outcomes.items():
        by_role.setdefault(roles[i], []).extend(got)
    # every prediction answered, and right
    for kind, value in by_role["predict"]:
        assert kind == "ok", value
        probabilities, sha256 = value
        assert sha256 == bundle.sha256
        assert probabilities[0] == pytest.approx(first["probability"], abs=2e-6)
    # during the storm a broadcast either got through, and right, or was told Unavailable
    # quickly; how many got through depends on the machine's load, not on the code
    ok_workers = [v for kind, v in by_role["workers"] if kind == "ok"]
    assert all(w and w[0]["model_sha256"] == bundle.sha256 for w in ok_workers), ok_workers
    assert all(v >= 1 for kind, v in by_role["check_workers"] if kind == "ok")
    print(f"{n} threads done in {elapsed:.1f} s; broadcasts ok/unavailable: "
          f"{sum(k == 'ok' for r in ('workers', 'check_workers') for k, _ in by_role[r])}/"
          f"{sum(k == 'unavailable' for r in ('workers', 'check_workers') for k, _ in by_role[r])}")


@pytest.fixture
def front_url(stack):
    """The stack's web, or one run from $MODELSERVE_TEST_APP_ROOT on the stack's services."""
    root = os.environ.get("MODELSERVE_TEST_APP_ROOT")
    if not root:
        yield stack.url
        return
    port = svc.free_port()
    proc = svc.spawn([sys.executable, "-m", "app.serve"], stack.base / "web-other.log",
                     cwd=root, env={**stack.env, "PYTHONPATH": str(Path(root)),
                                    "MODELSERVE_PORT": str(port), "MODELSERVE_HOST": "127.0.0.1"})
    try:
        svc.wait_port(port, 30, proc)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/readyz", timeout=15).status_code == 200, 60,
                 "the other web process ready")
        yield url
    finally:
        svc.stop(proc)


def _timed(method: str, url: str, **kw) -> tuple[int, float]:
    """(status, seconds) of one request; status 0 when it did not answer in time."""
    started = time.monotonic()
    try:
        r = requests.request(method, url, timeout=ANSWER_WITHIN * 3, **kw)
        status = r.status_code
    except requests.RequestException:
        status = 0
    return status, time.monotonic() - started


def test_a_flood_of_readiness_and_worker_requests_leaves_the_front_answering(front_url, holdout):
    instances, expected = holdout
    stop = threading.Event()
    statuses: dict[str, list[int]] = {"/readyz": [], "/api/v1/workers": []}
    ages: list[float] = []
    failures: list[str] = []

    def flood(path: str) -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.get(front_url + path, timeout=10)
                    statuses[path].append(r.status_code)
                    ages.append(r.json().get("age_s", -1.0))
                except (requests.RequestException, ValueError) as exc:
                    failures.append(f"{path}: {exc!r}")

    threads = [threading.Thread(target=flood, daemon=True, name=f"flood-{i}",
                                args=("/readyz" if i % 2 == 0 else "/api/v1/workers",))
               for i in range(FLOOD_CLIENTS)]
    predict = {"json": {"instances": instances[:1]}}
    during: list[tuple[str, int, float]] = []
    began = time.monotonic()
    for t in threads:
        t.start()
    try:
        time.sleep(3)  # the flood is on
        while time.monotonic() - began < FLOOD_SECONDS - 1:
            during.append(("predict", *_timed("POST", front_url + "/api/v1/predictions", **predict)))
            during.append(("healthz", *_timed("GET", front_url + "/healthz")))
            time.sleep(0.5)
    finally:
        while time.monotonic() - began < FLOOD_SECONDS:
            time.sleep(0.1)
        stop.set()
    after = [("predict", *_timed("POST", front_url + "/api/v1/predictions", **predict)),
             ("healthz", *_timed("GET", front_url + "/healthz"))]
    for t in threads:
        t.join(15)
    print(f"flood answers {({p: len(v) for p, v in statuses.items()})}, failures "
          f"{len(failures)}; slowest prediction/healthz during+after: "
          f"{max(s for _, _, s in during + after):.2f} s")
    slow = [(what, status, round(s, 1)) for what, status, s in during + after
            if status != 200 or s > ANSWER_WITHIN]
    answered = {p: len(v) for p, v in statuses.items()}
    assert not slow, (f"requests not answered 200 within {ANSWER_WITHIN:g} s during/after the "
                      f"flood: {slow}; flood answers {answered}, failures {failures[:5]}")
    r = requests.post(front_url + "/api/v1/predictions", json={"instances": instances[:3]},
                      timeout=10)
    assert [p["probability"] for p in r.json()["predictions"]] == pytest.approx(expected[:3],
                                                                             abs=2e-6)
    assert not failures, failures[:5]
    assert all(v for v in statuses.values()), answered
    # a healthy stack: the snapshot says ready; every answer carries its age, fresh
    assert set(statuses["/readyz"]) == {200} and set(statuses["/api/v1/workers"]) == {200}, \
        {p: sorted(set(v)) for p, v in statuses.items()}
    assert ages and 0 <= max(ages) < 15, max(ages)
