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
from tests.waiting import wait_for

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


def readyz(stack) -> tuple[int, dict]:
    """(status, body) of one /readyz (0 and the error if it did not answer)."""
    try:
        r = requests.get(stack.url + "/readyz", timeout=15)
        return r.status_code, r.json()
    except (requests.RequestException, ValueError) as exc:
        return 0, {"error": repr(exc)}


def wait_readyz_fails(stack, check: str, timeout: float = 60) -> dict:
    """Poll /readyz until it reports ``check`` failing (503): it answers from the diagnostics
    snapshot (app.diagnostics), refreshed about every second, and a loaded machine may take
    longer."""
    last: list = [None]

    def failing():
        last[0] = readyz(stack)
        status, body = last[0]
        return body if status == 503 and body.get("failed") == check else None

    return wait_for(failing, timeout, f"/readyz answering 503 with failed={check!r}",
                    interval=0.3, detail=lambda: f"last answer {last[0]}\n{stack.logs()}")


def _running(futures) -> bool:
    """True while every client runs; a client's failed assertion is raised here."""
    for f in futures:
        if f.done():
            f.result()
            raise AssertionError("a client stopped before it was told to")
    return True


def _since(times: list[float], t0: float) -> int:
    return sum(1 for t in times[:] if t >= t0)


def test_broker_restart_under_load_loses_nothing_accepted(fstack, holdout):
    instances, expected = holdout
    stop = threading.Event()
    accepted: list[tuple[int, str]] = []  # (row, status_url) of every 202
    answered: list[tuple[int, float]] = []  # (row, probability) of every 200
    served: list[float] = []  # when each request answered 200 or 202 was sent (monotonic)
    failed: list[float] = []  # when each request answered 503, or not at all, was sent
    others: list[int] = []

    def client(k):
        i = k
        with requests.Session() as s:
            while not stop.is_set():
                i = (i + 7) % len(instances)
                asynchronous = i % 2 == 0
                sent = time.monotonic()
                try:
                    r = s.post(fstack.url + "/api/v1/predictions", json={"instances": [instances[i]]},
                               params={"async": "true"} if asynchronous else {}, timeout=TIMEOUT + 5)
                except requests.RequestException:
                    others.append(-1)
                    failed.append(sent)
                    continue
                if r.status_code == 202:
                    accepted.append((i, r.json()["status_url"]))
                    served.append(sent)
                elif r.status_code == 200:
                    answered.append((i, r.json()["predictions"][0]["probability"]))
                    served.append(sent)
                else:
                    assert r.status_code == 503, r.text  # never a 500 or a hang
                    others.append(r.status_code)
                    failed.append(sent)

    # Each phase waits for what it needs (bounded): how much gets served in a given time, or
    # how long RabbitMQ takes to stop and boot, depends on the machine's load.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client, k) for k in range(8)]
        try:
            wait_for(lambda: _running(futures) and len(served) > 20, 120,
                     "more than 20 requests served before the broker outage",
                     detail=fstack.logs)
            fstack.broker.stop()
            down = time.monotonic()
            wait_for(lambda: _running(futures) and _since(failed, down), 60,
                     "a request sent while the broker is down answered 503 (or not at all)",
                     detail=lambda: f"served {len(served)}, failed {len(failed)}")
            fstack.broker.start()
            restarted = time.monotonic()
            wait_for(lambda: _running(futures) and _since(served, restarted) >= 20, 120,
                     "20 requests sent after the broker restart served (200 or 202)",
                     detail=lambda: f"{_since(failed, restarted)} failed since\n{fstack.logs()}")
        finally:
            stop.set()
        for f in futures:
            f.result()
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
    for body in (poll_task(fstack, u, timeout=120) for u in urls):
        assert body.get("state") == "SUCCESS", (body, fstack.logs())
        got = [p["probability"] for p in body["predictions"][:332]]
        assert got == pytest.approx(expected, abs=2e-6)
    log = fstack.base / "worker-0.log"
    wait_for(lambda: any(mark in log.read_text() for mark in ("SIGKILL", "signal 9")), 60,
             "the worker logging its pool processes' SIGKILL",
             detail=lambda: log.read_text()[-3000:])


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
    wait_readyz_fails(fstack, "workers")
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
    wait_readyz_fails(fstack, "broker")
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
    accepted: list[tuple[float, str]] = []  # (when its request was sent, status_url)

    def submit():
        while not stop.is_set():
            sent = time.monotonic()
            accepted.extend((sent, u) for u in submit_bulk(s, instances, tasks=1))

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            feeders = [pool.submit(submit) for _ in range(2)]
            try:
                worker = s.workers.pop()
                log = s.base / "worker-0.log"
                deadline = time.monotonic() + 60
                while "succeeded in" not in log.read_text() and time.monotonic() < deadline:
                    time.sleep(0.05)  # the worker is busy with the 10 000-row tasks
                worker.send_signal(signal.SIGTERM)
                assert worker.wait(150) == 0, log.read_text()[-3000:]  # warm, not killed
                gone = time.monotonic()
                accepted_meanwhile = len(accepted)
                wait_for(lambda: _running(feeders) and _since([t for t, _ in accepted], gone),
                         120, "an async request sent while no worker runs accepted")
                s.start_worker()
                restarted = time.monotonic()
                wait_for(lambda: _running(feeders) and _since([t for t, _ in accepted],
                                                               restarted),
                         120, "an async request sent after the new worker started accepted")
            finally:
                stop.set()
            for f in feeders:
                f.result()
        urls = [u for _, u in accepted]
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
