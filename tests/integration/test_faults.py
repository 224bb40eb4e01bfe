"""Fault tests on real services: broker restarts, killed workers, no workers at all."""

import concurrent.futures
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from tests.integration.stack import build_stack, teardown_stack

pytestmark = [pytest.mark.integration, pytest.mark.fault]
TIMEOUT = 3.0


@pytest.fixture
def fstack():
    """A private stack per test: these tests break it on purpose."""
    s = build_stack(predict_timeout=TIMEOUT)
    try:
        yield s
    finally:
        teardown_stack(s)


def poll_task(stack, status_url, timeout=90):
    deadline = time.monotonic() + timeout
    body = {}
    while time.monotonic() < deadline:
        try:
            body = requests.get(stack.url + status_url, timeout=10).json()
            if body.get("state") in ("SUCCESS", "FAILURE"):
                return body
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return body


def test_broker_restart_under_load_loses_nothing_accepted(fstack, holdout):
    instances, expected = holdout
    stop = threading.Event()
    accepted: list[tuple[int, str]] = []  # (row, status_url) of every 202
    answered: list[tuple[int, float]] = []  # (row, probability) of every 200
    others: list[int] = []

    def client(k):
        i = k
        with requests.Session() as s:
            while not stop.is_set():
                i = (i + 7) % len(instances)
                asynchronous = i % 2 == 0
                try:
                    r = s.post(fstack.url + "/api/v1/predictions", json={"instances": [instances[i]]},
                               params={"async": "true"} if asynchronous else {}, timeout=TIMEOUT + 5)
                except requests.RequestException:
                    others.append(-1)
                    continue
                if r.status_code == 202:
                    accepted.append((i, r.json()["status_url"]))
                elif r.status_code == 200:
                    answered.append((i, r.json()["predictions"][0]["probability"]))
                else:
                    assert r.status_code == 503, r.text  # never a 500 or a hang
                    others.append(r.status_code)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, k) for k in range(8)]
        time.sleep(3)
        before = len(accepted) + len(answered)
        fstack.broker.stop()
        time.sleep(2)
        fstack.broker.start()
        time.sleep(6)
        stop.set()
        for f in futures:
            f.result()
    after = len(accepted) + len(answered)
    assert before > 20 and after > before + 20, (before, after)  # served before and after
    assert others, "the broker outage was not observed by any request"
    for i, p in answered:
        assert abs(p - expected[i]) < 2e-6
    for i, url in accepted:
        body = poll_task(fstack, url)
        assert body.get("state") == "SUCCESS", (url, body, fstack.logs())
        assert abs(body["predictions"][0]["probability"] - expected[i]) < 2e-6


def submit_bulk(stack, instances, tasks):
    """Accept `tasks` async 10 000-row predictions; their status URLs."""
    rows = (instances * 31)[:10_000]
    urls = []
    for _ in range(tasks):
        r = requests.post(stack.url + "/api/v1/predictions", params={"async": "true"},
                          json={"instances": rows}, timeout=30)
        assert r.status_code == 202
        urls.append(r.json()["status_url"])
    return urls


def _children(proc):
    return psutil.Process(proc.pid).children(recursive=True)


def test_sigkilled_worker_processes_mid_task_are_redelivered(fstack, holdout):
    instances, expected = holdout
    urls = submit_bulk(fstack, instances, tasks=24)
    # The pool is busy with 10 000-row tasks: kill its processes while they work.
    worker = fstack.workers[0]
    for victim in _children(worker)[:2]:
        victim.send_signal(signal.SIGKILL)
    time.sleep(0.5)
    for body in (poll_task(fstack, u, timeout=120) for u in urls):
        assert body.get("state") == "SUCCESS", (body, fstack.logs())
        got = [p["probability"] for p in body["predictions"][:332]]
        assert got == pytest.approx(expected, abs=2e-6)
    log = (fstack.base / "worker-0.log").read_text()
    assert "SIGKILL" in log or "signal 9" in log, log[-3000:]


def test_whole_worker_killed_then_replaced_completes_its_tasks(fstack, holdout):
    instances, expected = holdout
    urls = submit_bulk(fstack, instances, tasks=16)
    worker = fstack.workers.pop()
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    fstack.start_worker()
    for body in (poll_task(fstack, u, timeout=120) for u in urls):
        assert body.get("state") == "SUCCESS", (body, fstack.logs())
        assert body["predictions"][0]["probability"] == pytest.approx(expected[0], abs=2e-6)


def test_no_workers_gives_503_within_the_timeout(fstack, holdout):
    instances, _ = holdout
    fstack.stop_workers()
    started = time.monotonic()
    r = requests.post(fstack.url + "/api/v1/predictions", json={"instances": instances[:1]},
                      timeout=TIMEOUT + 10)
    elapsed = time.monotonic() - started
    assert r.status_code == 503 and "no worker answered" in r.json()["error"]["message"]
    assert elapsed < TIMEOUT + 2, elapsed  # bounded by the configured timeout, not hung
    time.sleep(2.1)  # past the readiness cache
    ready = requests.get(fstack.url + "/readyz", timeout=15)
    assert ready.status_code == 503 and ready.json()["failed"] == "workers"
    fstack.start_worker()
    fstack.wait_ready()


def test_broker_down_gives_503_quickly_and_recovers(fstack, holdout):
    instances, expected = holdout
    fstack.broker.stop()
    started = time.monotonic()
    r = requests.post(fstack.url + "/api/v1/predictions", json={"instances": instances[:1]},
                      timeout=TIMEOUT + 10)
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"], r.text
    assert time.monotonic() - started < TIMEOUT + 2
    time.sleep(2.1)
    ready = requests.get(fstack.url + "/readyz", timeout=15)
    assert ready.status_code == 503 and ready.json()["failed"] == "broker"
    fstack.broker.start()
    fstack.wait_ready()
    r = requests.post(fstack.url + "/api/v1/predictions", json={"instances": instances[:1]}, timeout=10)
    assert r.status_code == 200 and abs(r.json()["predictions"][0]["probability"] - expected[0]) < 2e-6


def test_sigterm_warm_shutdown_finishes_running_tasks_and_loses_none(holdout):
    """SIGTERM to the worker's main process (what systemd sends with the unit's KillMode=mixed)
    is Celery's warm shutdown: it stops consuming, finishes what its pool is computing and exits
    0; what it had not started goes back to the queue. Tasks keep being accepted throughout,
    and a new worker completes every one: nothing accepted is lost or failed."""
    instances, expected = holdout
    s = build_stack(predict_timeout=TIMEOUT, MODELSERVE_LOG_LEVEL="INFO")
    stop = threading.Event()
    urls: list[str] = []

    def submit():
        while not stop.is_set():
            urls.extend(submit_bulk(s, instances, tasks=1))

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            feeders = [pool.submit(submit) for _ in range(2)]
            worker = s.workers.pop()
            log = s.base / "worker-0.log"
            deadline = time.monotonic() + 60
            while "succeeded in" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)  # the worker is busy with the 10 000-row tasks
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(150) == 0, log.read_text()[-3000:]  # warm, not killed
            accepted_meanwhile = len(urls)
            time.sleep(1)
            s.start_worker()
            time.sleep(2)
            stop.set()
            for f in feeders:
                f.result()
        text = log.read_text()
        assert "warm shutdown" in text.lower(), text[-3000:]
        assert "WorkerLostError" not in text and "exited with" not in text, text[-3000:]
        assert len(urls) > accepted_meanwhile > 0  # accepted before, during and after
        for body in (poll_task(s, u, timeout=120) for u in urls):
            assert body.get("state") == "SUCCESS", (body, s.logs())
            got = [p["probability"] for p in body["predictions"][:332]]
            assert got == pytest.approx(expected, abs=2e-6)
    finally:
        stop.set()
        teardown_stack(s)
