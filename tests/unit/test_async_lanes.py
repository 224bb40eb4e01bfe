"""Issue 10, "synchronous work keeps priority": in the real waitress server that app.serve
builds, async requests get at most MODELSERVE_ASYNC_INFLIGHT threads, and a synchronous request
is answered while async ones hold those threads and more wait in line."""

import concurrent.futures
import dataclasses
import threading
import time

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
        yield f"http://127.0.0.1:{srv.effective_port}", release, started, srv.task_dispatcher.queue
    finally:
        release.set()
        srv.close()
        srv.task_dispatcher.shutdown(timeout=5)


def _until(cond, timeout=20.0):
    """Poll cond() (a loaded machine may take a while to connect three clients)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the async requests never reached the server"
        time.sleep(0.01)


def test_a_sync_request_is_answered_while_async_requests_hold_their_threads(server):
    url, release, started, lanes = server
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        floods = [pool.submit(requests.post, url + "/api/v1/predictions?async=true", timeout=60)
                  for _ in range(3)]
        # the flood in place first: one async request being served, two waiting in their lane
        # (without this wait, on a loaded machine the sync request could arrive before them)
        _until(lambda: len(started) == 1 and len(lanes.bulk) == 2)
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
    assert lanes.popleft().task is s1 and lanes.popleft().task is s2  # sync first, in order
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


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Timers:
    """threading.Timer's stand-in: records (delay, fn) instead of starting threads."""

    def __init__(self):
        self.made = []

    def __call__(self, delay, fn):
        made = self.made

        class T:
            daemon = False

            def start(self):
                made.append((delay, fn))

        return T()


def _paced(share=0.25, bulk_threads=2):
    class Dispatcher:
        queue_cv = threading.Condition()
        threads = {0, 1}

    clock, timers = _Clock(), _Timers()
    return Lanes(Dispatcher(), bulk_threads, share, clock=clock, timer=timers), clock, timers


def test_async_runs_unpaced_on_its_threads_while_no_sync_request_is_in_progress():
    lanes, clock, _ = _paced()
    for q in ("async=true",) * 3:
        lanes.append(_Task(q))
    a1, a2 = lanes.popleft(), lanes.popleft()
    assert a1.task is not a2.task and len(lanes) == 0  # both threads of the lane, no more
    clock.now += 1.0
    a1.service()
    assert len(lanes) == 1  # no pause: nothing synchronous is in progress


def test_async_is_paced_to_its_share_while_a_sync_request_is_in_progress():
    lanes, clock, timers = _paced(share=0.25)
    lanes.append(_Task(""))
    sync = lanes.popleft()  # a synchronous request in progress
    for _ in range(3):
        lanes.append(_Task("async=true"))
    a1 = lanes.popleft()
    assert len(lanes) == 0  # one async request at a time while sync work is in progress
    clock.now += 0.2
    a1.service()  # took 0.2 s: at a share of 1/4, no async start for the next 0.6 s
    assert len(lanes) == 0
    assert [round(d, 6) for d, _ in timers.made] == [0.6]  # a wake-up when the pause ends
    clock.now += 0.59
    assert len(lanes) == 0 and len(timers.made) == 1  # one wake-up pending, not one per look
    clock.now += 0.01
    assert len(lanes) == 2
    a2 = lanes.popleft()
    sync.service()  # the synchronous request ends: the lane's second thread is free at once
    assert len(lanes) == 1
    a2.service()
    assert len(lanes) == 1


def test_a_waiting_sync_request_counts_as_sync_work_and_goes_first():
    lanes, clock, _ = _paced(share=0.5)
    lanes.append(_Task("async=true"))
    a1 = lanes.popleft()
    clock.now += 0.1
    s1 = _Task("")
    lanes.append(s1)
    a1.service()
    lanes.append(_Task("async=true"))
    assert len(lanes) == 1  # the waiting sync request alone: async is paced behind it
    assert lanes.popleft().task is s1
    assert len(lanes) == 0  # still paced: the sync request is now in progress


def test_the_pause_timer_wakes_a_waiting_thread():
    lanes, clock, timers = _paced(share=0.5)
    lanes.append(_Task(""))
    lanes.popleft()
    lanes.append(_Task("async=true"))
    a1 = lanes.popleft()
    clock.now += 0.1
    a1.service()
    lanes.append(_Task("async=true"))
    assert len(lanes) == 0 and len(timers.made) == 1
    woken = []

    def waiter():
        with lanes._cv:
            woken.append(lanes._cv.wait(10))

    t = threading.Thread(target=waiter)
    t.start()
    while not t.is_alive():
        pass
    clock.now += 0.1
    for _ in range(100):  # the waiter may not be waiting yet when the timer fires
        timers.made[0][1]()
        t.join(0.05)
        if woken:
            break
    assert woken == [True] and len(lanes) == 1


def test_shutdown_cancels_waiting_async_requests_too():
    lanes, _, _ = _paced(share=0.5, bulk_threads=1)
    lanes.append(_Task(""))
    lanes.popleft()
    for _ in range(3):
        lanes.append(_Task("async=true"))
    lanes.popleft()
    assert len(lanes) == 0
    lanes._dispatcher.threads = set()  # waitress's shutdown: every thread has exited
    assert len(lanes) == 2
    cancelled = []
    while len(lanes):
        task = lanes.popleft()
        task.task.cancel = lambda: cancelled.append(1)
        task.cancel()
    assert cancelled == [1, 1]


def test_async_busy_share_setting():
    from app.config import ConfigError

    base = {k: v for k, v in CFG.items() if "ASYNC" not in k}
    assert load_config(base).async_busy_share == 0.1
    assert load_config({**base, "MODELSERVE_ASYNC_BUSY_SHARE": "1"}).async_busy_share == 1.0
    for bad in ("0", "1.5", "x"):
        with pytest.raises(ConfigError, match="MODELSERVE_ASYNC_BUSY_SHARE"):
            load_config({**base, "MODELSERVE_ASYNC_BUSY_SHARE": bad})


def test_real_server_paces_async_requests_only_while_a_sync_request_is_in_progress():
    """app.serve's waitress, 4 threads, 2 async threads, share 1/2: with a synchronous request
    in progress the two async requests run one after the other, the second at least as long
    after the first as the first took; with none, both run at once."""
    import time

    hold, spans, both = threading.Event(), [], threading.Barrier(2, timeout=20)

    def app(environ, start_response):
        query = environ.get("QUERY_STRING", "")
        if "hold" in query:
            hold.wait(60)
        elif "async=true" in query:
            t0 = time.monotonic()
            if "together" in query:
                both.wait()  # raises BrokenBarrierError unless the other one runs meanwhile
            time.sleep(0.3)
            spans.append((t0, time.monotonic()))
        start_response("200 OK", [("Content-Length", "2"), ("Content-Type", "application/json")])
        return [b"{}"]

    cfg = dataclasses.replace(load_config({**CFG, "MODELSERVE_WEB_THREADS": "4",
                                           "MODELSERVE_ASYNC_INFLIGHT": "2",
                                           "MODELSERVE_ASYNC_BUSY_SHARE": "0.5"}), port=0)
    srv = make_server(app, cfg)
    threading.Thread(target=srv.run, daemon=True).start()
    url = f"http://127.0.0.1:{srv.effective_port}/api/v1/predictions"
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            held = pool.submit(requests.post, url + "?hold=1", timeout=60)
            while not srv.task_dispatcher.queue.sync_active:
                time.sleep(0.01)
            paced = [pool.submit(requests.post, url + "?async=true", timeout=60) for _ in range(2)]
            assert [f.result().status_code for f in paced] == [200, 200]
            (s1, e1), (s2, e2) = sorted(spans)
            assert s2 >= e1 + (e1 - s1) * 0.99  # after the first, and after its pause
            hold.set()
            assert held.result().status_code == 200
            while srv.task_dispatcher.queue.sync_active:
                time.sleep(0.01)
            spans.clear()
            together = [pool.submit(requests.post, url + "?async=true&together=1", timeout=60)
                        for _ in range(2)]
            assert [f.result().status_code for f in together] == [200, 200]
    finally:
        hold.set()
        srv.close()
        srv.task_dispatcher.shutdown(timeout=5)
