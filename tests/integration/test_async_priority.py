"""Issue 10, "synchronous work keeps priority", against the real stack (RabbitMQ, Redis, the
worker as `python -m app.worker` starts it, waitress): async work runs in a worker of its own
(one process, niced), so synchronous requests are served while async work is stuck; async
requests beyond the web's admission limit get 429 + Retry-After at once while sync ones get 200."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from app.config import load_config
from app.web import create_app

pytestmark = pytest.mark.integration

GOOD = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _async_workers(stack) -> list[int]:
    """The async-queue workers the stack's `python -m app.worker` started."""
    return [c for c in _children(stack.workers[0].pid)
            if _env(c).get("MODELSERVE_WORKER_QUEUES") == "async"]


def _state(stack, status_url: str) -> str:
    return requests.get(stack.url + status_url, timeout=10).json()["state"]


def test_async_work_runs_in_a_niced_worker_of_its_own_and_sync_is_served_while_it_is_stuck(stack):
    found = _async_workers(stack)
    assert len(found) == 1, f"no async worker of its own beside the sync one: {found}"
    child = found[0]
    base = os.getpriority(os.PRIO_PROCESS, stack.workers[0].pid)
    assert os.getpriority(os.PRIO_PROCESS, child) == min(19, base + 10)  # MODELSERVE_ASYNC_NICE
    os.kill(child, signal.SIGSTOP)  # async work is stuck: nothing consumes its queue now
    try:
        with requests.Session() as s:
            accepted = []
            for _ in range(5):
                r = s.post(stack.url + "/api/v1/predictions", params={"async": "true"},
                           json={"instances": [GOOD]}, timeout=30)
                assert r.status_code == 202, r.text
                accepted.append(r.json()["status_url"])
            # the sync worker's processes are all free for it
            r = s.post(stack.url + "/api/v1/predictions", json={"instances": [GOOD]}, timeout=30)
            assert r.status_code == 200, r.text
            assert [_state(stack, u) for u in accepted] == ["PENDING"] * 5
    finally:
        os.kill(child, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_state(stack, u) != "SUCCESS" for u in accepted):
        time.sleep(0.2)
    assert [_state(stack, u) for u in accepted] == ["SUCCESS"] * 5


def test_async_beyond_the_admission_limit_is_429_at_once_and_sync_still_200(stack, bundle):
    config = load_config(stack.env)
    assert config.async_inflight == 2  # the documented default
    app = create_app(config, bundle)
    client = app.extensions["modelserve"]["client"]
    held, release = threading.Barrier(config.async_inflight + 1), threading.Event()

    def hold():
        with client.async_admission():
            held.wait(30)
            release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(config.async_inflight)]
    try:
        for t in holders:
            t.start()
        held.wait(30)  # every async slot is taken
        web = app.test_client()
        r = web.post("/api/v1/predictions?async=true", json={"instances": [GOOD]})
        assert r.status_code == 429, r.get_data(as_text=True)
        assert r.headers["Retry-After"] == "1"
        err = r.get_json()["error"]
        assert (err["type"], err["rule"], err["limit"]) == ("too_many_requests", "async_inflight", 2)
        assert "MODELSERVE_ASYNC_INFLIGHT" in err["message"]
        r = web.post("/api/v1/predictions", json={"instances": [GOOD]})
        assert r.status_code == 200, r.get_data(as_text=True)
        release.set()
        for t in holders:
            t.join(30)
        r = web.post("/api/v1/predictions?async=true", json={"instances": [GOOD]})
        assert r.status_code == 202, r.get_data(as_text=True)
    finally:
        release.set()
        client.close()


def test_an_async_worker_that_dies_is_restarted_and_serves_again(stack):
    """app.worker.AsyncWorker's watch loop: the async queue's worker killed outright (an OOM
    kill) comes back, as a new process, and async work accepted meanwhile completes."""
    (child,) = _async_workers(stack)
    os.kill(child, signal.SIGKILL)
    with requests.Session() as s:
        r = s.post(stack.url + "/api/v1/predictions", params={"async": "true"},
                   json={"instances": [GOOD]}, timeout=30)
        assert r.status_code == 202, r.text  # accepted while no worker consumes the queue
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _state(stack, r.json()["status_url"]) != "SUCCESS":
            time.sleep(0.2)
        assert _state(stack, r.json()["status_url"]) == "SUCCESS"
    found = _async_workers(stack)
    assert len(found) == 1 and found[0] != child, (child, found)
    assert stack.workers[0].poll() is None  # the sync worker never stopped
