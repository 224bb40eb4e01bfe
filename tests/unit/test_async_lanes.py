"""Issue 10, "synchronous work keeps priority": in the real waitress server that app.serve
builds, async requests get at most MODELSERVE_ASYNC_INFLIGHT threads, and a synchronous request
is answered while async ones hold those threads and more wait in line."""

import concurrent.futures
import dataclasses
import threading

import pytest
import requests

from app.config import load_config
from app.serve import Lanes, _is_async, make_server

CFG = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/modelserve",
       "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0", "MODELSERVE_INSTANCE_ENV": "/nonexistent",
       "MODELSERVE_HOST": "127.0.0.1", "MODELSERVE_WEB_THREADS": "2",
       "MODELSERVE_ASYNC_INFLIGHT": "1"}


@pytest.fixture
def server():
    """app.serve's waitress (2 threads, async_inflight 1) around an app whose async requests
    block until released; yields (url, release event, async requests started)."""
    release, started = threading.Event(), []

    def app(environ, start_response):
        if "async=true" in environ.get("QUERY_STRING", ""):
            started.append(1)
            release.wait(60)
            body = b'{"async": true}'
        else:
            body = b'{"sync": true}'
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    srv = make_server(app, dataclasses.replace(load_config(CFG), port=0))  # any free port
    loop = threading.Thread(target=srv.run, daemon=True)
    loop.start()
    try:
        yield f"http://127.0.0.1:{srv.effective_port}", release, started
    finally:
        release.set()
        srv.close()
        srv.task_dispatcher.shutdown(timeout=5)


def test_a_sync_request_is_answered_while_async_requests_hold_their_threads(server):
    url, release, started = server
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(requests.post, url + "/api/v1/predictions?async=true", timeout=60)
                  for _ in range(3)]
        # answered while the async requests are still blocked (before release): on a server
        # whose threads any request may take, both threads would be stuck in async requests
        sync = requests.post(url + "/api/v1/predictions", timeout=30)
        assert sync.status_code == 200 and sync.json() == {"sync": True}
        assert not release.is_set() and not any(f.done() for f in floods)
        assert len(started) == 1  # one thread for async work, the others wait in their lane
        release.set()
        assert [f.result().status_code for f in floods] == [200, 200, 200]
    assert len(started) == 3


class _Task:
    def __init__(self, query):
        self.requests = [type("R", (), {"query": query})()]

    def service(self):
        pass

    def cancel(self):
        pass


def test_lanes_take_sync_first_and_cap_async():
    class Dispatcher:
        queue_cv = threading.Condition()

    lanes = Lanes(Dispatcher(), bulk_threads=1)
    a1, a2, s1, s2 = _Task("async=true"), _Task("x=1&async=1"), _Task(""), _Task("async=false")
    for t in (a1, a2, s1, s2):
        lanes.append(t)
    assert len(lanes) == 4
    assert lanes.popleft() is s1 and lanes.popleft() is s2  # sync first, in order
    bulk = lanes.popleft()
    assert bulk.task is a1 and len(lanes) == 0  # the async lane's one thread is taken
    bulk.service()  # done: the lane's thread slot is free again
    assert len(lanes) == 1 and lanes.popleft().task is a2
    assert _is_async(_Task("ASYNC=TRUE")) and not _is_async(_Task("notasync=true"))


def test_async_admission_settings_default_and_bounds():
    from app.config import ConfigError

    base = {k: v for k, v in CFG.items() if "ASYNC" not in k}
    cfg = load_config(base)
    assert (cfg.async_inflight, cfg.async_nice) == (2, 10)
    cfg = load_config({**base, "MODELSERVE_ASYNC_INFLIGHT": "5", "MODELSERVE_ASYNC_NICE": "0"})
    assert (cfg.async_inflight, cfg.async_nice) == (5, 0)
    for key, bad in (("MODELSERVE_ASYNC_INFLIGHT", "0"), ("MODELSERVE_ASYNC_INFLIGHT", "x"),
                     ("MODELSERVE_ASYNC_NICE", "20"), ("MODELSERVE_ASYNC_NICE", "-1")):
        with pytest.raises(ConfigError, match=key):
            load_config({**base, key: bad})
