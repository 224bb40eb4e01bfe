"""app.limits: the pre-scan agrees with a real parse; the parse budget sheds load with 503s."""

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.dispatch import Unavailable
from app.limits import ByteBudget, Overloaded, json_error_body, prescan

values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{},"\\ab'),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(
                          st.text(alphabet='[]{},"\\ab', max_size=4), c, max_size=4),
                      max_leaves=20)


def depth(v):
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    return 0


def count(v):
    if isinstance(v, list):
        return 1 + sum(count(x) for x in v)
    if isinstance(v, dict):
        return 1 + sum(count(x) for x in v.values())
    return 1


def at_depth_2(v):
    kids = v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else []
    return sum(len(k) for k in kids if isinstance(k, (list, dict)))


@settings(max_examples=300, deadline=None)
@given(value=values, compact=st.booleans())
def test_prescan_depth_is_exact_and_counts_bound_the_parse(value, compact):
    raw = json.dumps(value, separators=(",", ":") if compact else None).encode()
    shape = prescan(raw)
    assert prescan(raw, chunk=3) == shape  # chunk boundaries change nothing
    assert shape.depth == depth(value)
    assert shape.rows >= at_depth_2(value)
    assert shape.values >= count(value)


def test_prescan_rows_of_a_real_body():
    body = json.dumps({"instances": [{"a": 1, "b": [1, 2]}] * 7}).encode()
    assert prescan(body).rows == 7 and prescan(body).depth == 4


def test_budget_sheds_load_with_an_unavailable_error():
    budget = ByteBudget(100, wait=0.05)
    with budget.hold(60):
        with pytest.raises(Overloaded) as err:
            with budget.hold(60):
                pass
        assert isinstance(err.value, Unavailable)  # the app's 503 + Retry-After
        with budget.hold(40):
            assert budget.used == 100
    assert budget.used == 0


def test_budget_waits_briefly_for_a_release():
    budget = ByteBudget(100, wait=5)
    entered = threading.Event()
    release = threading.Event()

    def holder():
        with budget.hold(100):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    entered.wait(5)
    threading.Timer(0.1, release.set).start()
    with budget.hold(10**9):  # clamped to the capacity: a huge Content-Length still fits alone
        assert budget.used == 100
    t.join()


def test_waitress_errors_in_the_api_shape():
    err = json.loads(json_error_body(413, "Request Entity Too Large", "", 1024))["error"]
    assert (err["field"], err["rule"]) == ("body", "max_bytes") and "1024" in err["message"]
    err = json.loads(json_error_body(400, "Bad Request", "bad header", 1024))["error"]
    assert err["type"] == "bad_request" and "bad header" in err["message"]


def test_worker_queue_selection():
    from app.celery_app import ASYNC_QUEUE, QUEUE
    from app.config import ConfigError
    from app.worker import _queues

    assert _queues("sync,async") == f"{QUEUE},{ASYNC_QUEUE}"
    assert _queues(" async ") == ASYNC_QUEUE
    for bad in ("", "sync,priority", "predict"):
        with pytest.raises(ConfigError, match="MODELSERVE_WORKER_QUEUES"):
            _queues(bad)


def test_the_async_queue_is_bounded_and_sync_prefetch_is_one():
    from app.celery_app import ASYNC_QUEUE, QUEUE, make_celery
    from app.config import load_config

    config = load_config({"MODELSERVE_BROKER_URL": "amqp://h", "MODELSERVE_RESULT_URL": "redis://h",
                          "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_ASYNC_QUEUE_MAX": "7"})
    conf = make_celery(config).conf
    queues = {q.name: q for q in conf.task_queues}
    assert queues[ASYNC_QUEUE].queue_arguments == {"x-max-length": 7, "x-overflow": "reject-publish"}
    assert not queues[QUEUE].queue_arguments and ASYNC_QUEUE != "modelserve.async"
    assert conf.worker_prefetch_multiplier == 1
