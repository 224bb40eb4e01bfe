"""Validation rules: every bad input names its field and rule; good input keeps feature order."""

import json

import pytest

from app.bundle import FEATURES
from app.schema import ValidationError, parse_json, validate_instances

GOOD = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}


def check(payload, max_rows=10):
    return validate_instances(payload, FEATURES, max_rows)


def test_valid_rows_come_back_in_feature_order():
    shuffled = dict(reversed(list(GOOD.items())))
    assert check({"instances": [shuffled, GOOD]}) == [[1, 89, 66, 23, 28.1, 0.167, 21]] * 2


def test_integral_float_is_accepted_for_an_integer_feature():
    assert check({"instances": [{**GOOD, "age": 21.0}]})[0][-1] == 21.0


@pytest.mark.parametrize("payload, status, field, rule", [
    ([], 400, "body", "type"),
    ("instances", 400, "body", "type"),
    ({}, 400, "instances", "required"),
    ({"instances": [GOOD], "extra": 1}, 400, "extra", "unknown_field"),
    ({"instances": {}}, 400, "instances", "type"),
    ({"instances": []}, 400, "instances", "min_items"),
    ({"instances": [GOOD] * 11}, 413, "instances", "max_items"),
    ({"instances": [GOOD, 5]}, 400, "instances[1]", "type"),
    ({"instances": [{k: v for k, v in GOOD.items() if k != "glu"}]}, 400, "instances[0].glu", "required"),
    ({"instances": [{**GOOD, "zzz": 1}]}, 400, "instances[0].zzz", "unknown_field"),
    ({"instances": [{**GOOD, "": 1}]}, 400, 'instances[0][""]', "unknown_field"),
    ({"": 1}, 400, '[""]', "unknown_field"),
    ({"instances": [{**GOOD, "glu": "89"}]}, 400, "instances[0].glu", "type"),
    ({"instances": [{**GOOD, "glu": None}]}, 400, "instances[0].glu", "type"),
    ({"instances": [{**GOOD, "glu": True}]}, 400, "instances[0].glu", "type"),
    ({"instances": [{**GOOD, "glu": [89]}]}, 400, "instances[0].glu", "type"),
    ({"instances": [{**GOOD, "glu": float("inf")}]}, 400, "instances[0].glu", "finite"),
    ({"instances": [{**GOOD, "glu": float("nan")}]}, 400, "instances[0].glu", "finite"),
    ({"instances": [{**GOOD, "glu": 301}]}, 400, "instances[0].glu", "range"),
    ({"instances": [{**GOOD, "bmi": -0.1}]}, 400, "instances[0].bmi", "range"),
    ({"instances": [{**GOOD, "npreg": 2.5}]}, 400, "instances[0].npreg", "integer"),
    ({"instances": [{**GOOD, "age": 121}]}, 400, "instances[0].age", "range"),
])
def test_bad_payloads_name_field_and_rule(payload, status, field, rule):
    with pytest.raises(ValidationError) as err:
        check(payload)
    assert (err.value.status, err.value.field, err.value.rule) == (status, field, rule)
    body = err.value.to_dict()["error"]
    assert body["field"] == field and body["rule"] == rule and body["message"]


@pytest.mark.parametrize("raw, ctype, status, rule", [
    (b'{"instances": [', "application/json", 400, "json"),
    (b"", "application/json", 400, "required"),
    (b'{"instances": NaN}', "application/json", 400, "finite"),
    (b'{"instances": [{"glu": Infinity}]}', "application/json", 400, "finite"),
    (b'{"instances": [{"glu": -Infinity}]}', "application/json", 400, "finite"),
    (b"\xff\xfe{}", "application/json", 400, "encoding"),
    (b"{}", "text/plain", 415, "media_type"),
    (b"{}", None, 415, "media_type"),
])
def test_bad_bodies(raw, ctype, status, rule):
    with pytest.raises(ValidationError) as err:
        parse_json(raw, ctype)
    assert (err.value.status, err.value.rule) == (status, rule)


def test_json_with_charset_parameter_is_accepted():
    assert parse_json(json.dumps({"a": 1}).encode(), "application/json; charset=utf-8") == {"a": 1}


def test_huge_exponent_parses_to_inf_and_is_rejected_as_not_finite():
    payload = parse_json(b'{"instances": [{"npreg": 1, "glu": 1e999, "bp": 1, "skin": 1, '
                         b'"bmi": 1, "ped": 1, "age": 30}]}', "application/json")
    with pytest.raises(ValidationError) as err:
        check(payload)
    assert (err.value.field, err.value.rule) == ("instances[0].glu", "finite")


# --- bounded work: the pre-scan refuses before json.loads builds anything (issue 10) ---------

def parse(raw, max_rows=10_000):
    return parse_json(raw, "application/json", max_rows=max_rows, features=len(FEATURES))


def rejected(raw, **kw):
    with pytest.raises(ValidationError) as err:
        parse(raw, **kw)
    return err.value


def test_a_body_nested_100_000_deep_is_a_400_naming_the_depth_rule():
    raw = b'{"instances":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RecursionError):  # what json.loads alone does with it
        json.loads(raw)
    err = rejected(raw)
    assert (err.status, err.field, err.rule) == (400, "body", "max_depth")
    assert "100001" in err.message


def test_depth_limit_applies_without_a_row_limit_and_not_to_brackets_in_strings():
    err = rejected(b"[" * 17 + b"]" * 17, max_rows=None)
    assert err.rule == "max_depth"
    assert parse(b'{"instances": "' + b"[" * 32 + b'\\"[[[["}') == {"instances": "[" * 32 + '"[[[['}


def test_too_many_rows_are_refused_by_the_prescan_before_parsing(monkeypatch):
    raw = b'{"instances":[' + b",".join([b"{}"] * 400_000) + b"]}"
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("json.loads was called"))
    err = rejected(raw)
    assert (err.status, err.field, err.rule) == (413, "instances", "max_items")
    assert "400000" in err.message


def test_too_many_values_are_refused_by_the_prescan():
    raw = b'{"instances":[[' + b",".join([b"0"] * 200_000) + b"]]}"
    err = rejected(raw)
    assert (err.status, err.field, err.rule) == (413, "body", "max_values")


def test_the_prescan_admits_a_full_batch_of_real_rows():
    rows = [GOOD] * 10_000
    assert len(parse(json.dumps({"instances": rows}).encode())["instances"]) == 10_000
    assert rejected(json.dumps({"instances": rows + [GOOD]}).encode()).rule == "max_items"


@pytest.mark.parametrize("raw, field", [
    (b'{"instances": [], "instances": [{}]}', "body.instances"),
    (b'{"instances": [{"glu": 1, "glu": 2}]}', "body.glu"),
])
def test_duplicate_keys_are_refused(raw, field):
    err = rejected(raw)
    assert (err.status, err.field, err.rule) == (400, field, "duplicate_key")


def test_a_byte_order_mark_is_malformed_json():
    assert rejected(b"\xef\xbb\xbf" + json.dumps({"instances": [GOOD]}).encode()).rule == "json"


def test_an_integer_of_a_million_digits_is_malformed_json_not_a_hang():
    err = rejected(b'{"instances": [{"glu": ' + b"9" * 1_000_000 + b"}]}")
    assert (err.status, err.rule) == (400, "json")
