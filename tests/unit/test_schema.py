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
