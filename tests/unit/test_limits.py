"""app.limits: the pre-scan agrees with a real parse; the parse budget sheds load with 503s."""

import json
import re
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.dispatch import Unavailable
from app.limits import ByteBudget, Overloaded, Shape, json_error_body, prescan
from bench import prescan_bench

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


# --- prescan: same figures as the regex version, in linear time (issue 24) ------------------

_OLD_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def old_prescan(body: bytes) -> Shape:
    """The regex-based prescan before issue 24 (quadratic on `"` + `\\"`*k): the reference for
    valid JSON. Only ever run on small bodies."""
    if b"\\" in body:
        body = _OLD_STRING.sub(b'""', body)
    delta = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
    level = deepest = values = rows = 0
    inside = False
    for b in body:
        if b == ord('"'):
            inside = not inside
        elif not inside:
            d = delta.get(b, 0)
            level += d
            deepest = max(deepest, level)
            if b == ord(",") or d == 1:
                values += 1
                rows += level == 2
    return Shape(deepest, values + 1 if body else 0, rows)


def rule_prescan(body: bytes) -> Shape:
    """The new rule byte by byte, for any bytes: a '"' is a delimiter unless an odd run of
    backslashes precedes it; brackets and commas count outside the delimited spans."""
    level = deepest = values = rows = run = 0
    inside = False
    for b in body:
        if b == ord("\\"):
            run += 1
            continue
        if b == ord('"'):
            inside ^= run % 2 == 0
        elif not inside and b in b"[{]},":
            level += 1 if b in b"[{" else -1 if b in b"]}" else 0
            deepest = max(deepest, level)
            if b in b"[{,":
                values += 1
                rows += level == 2
        run = 0
    return Shape(deepest, values + 1 if body else 0, rows)


tricky = st.text(alphabet=st.sampled_from(list('\\"[]{},:ab \u00e9\u2028\x00\x1f\U0001f600')),
                 max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky,
    lambda c: st.lists(c, max_size=5) | st.dictionaries(tricky, c, max_size=5), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=json_values, compact=st.booleans(), ascii_only=st.booleans(),
       chunk=st.integers(1, 40))
def test_prescan_equals_the_regex_version_on_valid_json(value, compact, ascii_only, chunk):
    raw = json.dumps(value, separators=(",", ":") if compact else None,
                     ensure_ascii=ascii_only).encode()
    shape = prescan(raw)
    assert shape == old_prescan(raw) == rule_prescan(raw)
    assert prescan(raw, chunk=chunk) == shape
    assert shape.depth == depth(value)


@pytest.mark.parametrize("body", [
    rb'"\\"', rb'["\\\\",[1]]', rb'["\"",[1]]', rb'{"a\\\"[":"\\\\\\\"{,",",":[[],{}]}',
    rb'["\u0022[", "\\u0022{", "\\\u005c"]', rb'[' + rb'"\\\"",' * 50 + rb'1]',
    rb'{"k":"' + b'\\\\' * 70 + rb'","v":[[1,2],[3]]}',
])
def test_prescan_on_escape_heavy_bodies(body):
    json.loads(body)  # valid JSON
    for chunk in (1, 2, 3, 5, 64, 1 << 16):
        assert prescan(body, chunk=chunk) == old_prescan(body) == rule_prescan(body)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=80) | st.text(alphabet='\\"[]{},a', max_size=80).map(str.encode),
       chunk=st.integers(1, 20))
def test_prescan_on_any_bytes_follows_one_rule_whatever_the_chunks(body, chunk):
    shape = prescan(body)
    assert shape == rule_prescan(body) == prescan(body, chunk=chunk)
    if b"\\" not in body:  # no escapes: exactly the old figures, valid JSON or not
        assert shape == old_prescan(body)


MiB = 1 << 20
SIZES = (MiB // 8, MiB // 4, MiB // 2, MiB)


# worst cases up to the 1 MiB body limit (truncated to size: valid JSON or not, all count);
# the benchmark times the same shapes
SHAPES = prescan_bench.SHAPES


class _TooSlow(Exception):
    pass


def _timed(body: bytes, limit: float) -> float:
    """Seconds one prescan takes; raises _TooSlow past `limit` (the regex checks signals)."""
    def alarm(*_):
        raise _TooSlow
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        t = time.perf_counter()
        prescan(body)
        return time.perf_counter() - t
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _ms_per_mib(shape: str) -> dict[int, float]:
    per_mib = {}
    for size in SIZES:
        body = SHAPES[shape](size)
        assert len(body) == size
        try:
            best = min(_timed(body, 1.0) for _ in range(3))
        except _TooSlow:
            pytest.fail(f"prescan of {size} bytes of {shape!r} took over 1 s")
        per_mib[size] = best * 1e3 * MiB / size
    return per_mib


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_prescan_is_linear_up_to_the_body_limit(shape):
    """Time per MiB is flat from 128 KiB to 1 MiB (a quadratic scan would grow 8x), and 1 MiB
    takes well under a second (a few ms). Any single run over 1 s fails at once: the regex
    this replaced takes minutes on 128 KiB of `"` + `\\"`*k."""
    per_mib = _ms_per_mib(shape)
    if per_mib[MiB] > 3 * per_mib[MiB // 8]:  # one more try: the machine may be busy
        per_mib = _ms_per_mib(shape)
    assert per_mib[MiB] <= 3 * per_mib[MiB // 8], \
        f"{shape}: {per_mib[MiB]:.2f} ms/MiB at 1 MiB vs {per_mib[MiB // 8]:.2f} at 128 KiB"
    assert per_mib[MiB] < 1000  # 1 MiB in under 1 s
