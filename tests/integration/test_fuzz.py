"""Property-based fuzzing of the API: generated bad bodies always get a 4xx JSON error."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.bundle import FEATURES
from app.config import load_config
from app.web import create_app

pytestmark = pytest.mark.integration

NAMES = [f["name"] for f in FEATURES]
GOOD = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)


def bad_value(feature):
    """A value that breaks one rule of this feature: type, finiteness, integrality or range."""
    lo, hi = feature["min"], feature["max"]
    out_of_range = (st.floats(max_value=lo, exclude_max=True, allow_nan=False)
                    | st.floats(min_value=hi, exclude_min=True, allow_nan=False)
                    | st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1))
    wrong_type = st.none() | st.booleans() | st.text(max_size=5) | st.lists(st.integers(), max_size=2)
    options = out_of_range | wrong_type | st.sampled_from([math.nan, math.inf, -math.inf])
    if feature["type"] == "integer":
        options = options | st.floats(min_value=lo, max_value=hi).filter(lambda v: not v.is_integer())
    return options


@st.composite
def bad_rows(draw):
    """A row with one field broken, missing, or an unknown field added."""
    row = dict(GOOD)
    how = draw(st.sampled_from(["value", "missing", "extra"]))
    if how == "value":
        feature = draw(st.sampled_from(FEATURES))
        row[feature["name"]] = draw(bad_value(feature))
    elif how == "missing":
        del row[draw(st.sampled_from(NAMES))]
    else:
        row[draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in NAMES))] = draw(json_values)
    return row


@st.composite
def bad_bodies(draw):
    """(bytes, content type) that the API must reject with a 4xx."""
    kind = draw(st.sampled_from(["row", "shape", "json", "bytes", "ctype", "size"]))
    ctype = "application/json"
    if kind == "row":
        rows = [dict(GOOD)] * draw(st.integers(0, 3))
        rows.insert(draw(st.integers(0, len(rows))), draw(bad_rows()))
        body = json.dumps({"instances": rows}).encode()  # NaN/Infinity are emitted as such
    elif kind == "shape":
        value = draw(json_values.filter(lambda v: not (isinstance(v, dict) and set(v) == {"instances"}
                                                       and isinstance(v["instances"], list)
                                                       and v["instances"])))
        body = json.dumps(value).encode()
    elif kind == "json":
        text = json.dumps({"instances": [GOOD]})
        cut = draw(st.integers(0, len(text) - 1))
        body = text[:cut].encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=40).filter(lambda b: not _parses(b)))
    elif kind == "ctype":
        body = json.dumps({"instances": [GOOD]}).encode()
        ctype = draw(st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "",
                                      "application/jsonx", "multipart/form-data"]))
    else:
        body = json.dumps({"instances": [GOOD] * draw(st.integers(11, 40))}).encode()
    return body, ctype


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def api(stack, bundle):
    """The real app (real broker client on the test stack), in-process for fuzzing speed."""
    app = create_app(load_config({**stack.env, "MODELSERVE_MAX_BATCH_ROWS": "10"}), bundle)
    yield app.test_client()
    app.extensions["modelserve"]["client"].close()


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=bad_bodies())
def test_bad_bodies_always_get_a_4xx_json_error(api, case):
    body, ctype = case
    r = api.post("/api/v1/predictions", data=body, headers={"Content-Type": ctype} if ctype else {})
    assert 400 <= r.status_code < 500, (r.status_code, body[:200])
    err = r.get_json()["error"]
    assert err["field"] and err["rule"] and err["message"]


def test_a_good_body_still_scores(api):
    """The fuzz target is live: the same app answers a valid body with 200."""
    r = api.post("/api/v1/predictions", json={"instances": [GOOD]})
    assert r.status_code == 200 and len(r.get_json()["predictions"]) == 1
