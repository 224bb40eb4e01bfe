"""The one input schema of the prediction API. Every rejection names the field and the rule."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


class ValidationError(Exception):
    """Bad input: `field` is a JSON path like instances[3].glu, `rule` the rule it broke."""

    def __init__(self, field: str, rule: str, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.rule, self.message, self.status = field, rule, message, status

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"type": "validation_error", "field": self.field, "rule": self.rule,
                          "message": self.message}}


MAX_DEPTH = 16  # a valid body nests 3 deep: {"instances": [{...}]}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValidationError(_member("body", key), "duplicate_key",
                                      f"member {key!r} appears more than once in one object")
            seen.add(key)
    return obj


def parse_json(body: bytes, content_type: str | None, *, max_rows: int | None = None,
               features: int = 7, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a JSON request body strictly: right media type, UTF-8, no NaN/Infinity, no
    duplicate keys, nesting at most `max_depth` deep. With `max_rows`, a body holding more rows
    (or more values than that many rows of `features` fields) is refused by a linear pre-scan
    of its bytes before any Python object is built."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ValidationError("Content-Type", "media_type",
                              "Content-Type must be application/json", status=415)
    if not body:
        raise ValidationError("body", "required", "request body is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ValidationError("body", "encoding", "request body is not UTF-8") from None
    from app.limits import prescan

    shape = prescan(body)
    if shape.depth > max_depth:
        raise ValidationError("body", "max_depth", f"the body nests {shape.depth} levels deep; "
                              f"at most {max_depth} are accepted")
    if max_rows is not None:
        if shape.rows > max_rows:
            raise ValidationError("instances", "max_items",
                                  f"'instances' holds about {shape.rows} rows; at most {max_rows} "
                                  "are accepted per request", status=413)
        max_values = max_rows * (features + 2) + 16
        if shape.values > max_values:
            raise ValidationError("body", "max_values",
                                  f"the body holds about {shape.values} JSON values; at most "
                                  f"{max_values} are accepted", status=413)
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:  # the pre-scan bounds depth; this is a second line
        raise ValidationError("body", "max_depth", "the body nests too deep") from None
    except ValueError as exc:
        if "finite" in str(exc):
            raise ValidationError("body", "finite", str(exc)) from None
        raise ValidationError("body", "json", f"malformed JSON: {exc}") from None


def validate_instances(payload: Any, features: Sequence[dict[str, Any]],
                       max_rows: int) -> list[list[float]]:
    """Check {"instances": [{feature: number, ...}, ...]} and return rows in feature order."""
    if not isinstance(payload, dict):
        raise ValidationError("body", "type", "body must be a JSON object with 'instances'")
    for key in payload:
        if key != "instances":
            raise ValidationError(_member("", key), "unknown_field",
                                  f"unknown field {key!r}: the body has only 'instances'")
    if "instances" not in payload:
        raise ValidationError("instances", "required", "'instances' is required")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise ValidationError("instances", "type", "'instances' must be an array of objects")
    if not instances:
        raise ValidationError("instances", "min_items", "'instances' must hold at least 1 row")
    if len(instances) > max_rows:
        raise ValidationError("instances", "max_items",
                              f"'instances' holds {len(instances)} rows; at most {max_rows} "
                              "are accepted per request", status=413)
    names = [f["name"] for f in features]
    expected = set(names)
    specs = [(f["name"], f["type"] == "integer", float(f["min"]), float(f["max"]))
             for f in features]
    rows: list[list[float]] = []
    append = rows.append
    for i, item in enumerate(instances):
        if type(item) is not dict:
            raise ValidationError(f"instances[{i}]", "type", "each instance must be an object")
        if item.keys() != expected:
            _key_error(i, item, names)
        row = []
        for name, integer, lo, hi in specs:
            value = item[name]
            kind = type(value)
            if kind is not int and kind is not float:
                raise ValidationError(f"instances[{i}].{name}", "type",
                                      f"{name} must be a number, got {_json_type(value)}")
            if kind is float and not math.isfinite(value):
                raise ValidationError(f"instances[{i}].{name}", "finite", f"{name} must be finite")
            if integer and kind is float and not value.is_integer():
                raise ValidationError(f"instances[{i}].{name}", "integer",
                                      f"{name} must be a whole number")
            if not lo <= value <= hi:
                raise ValidationError(f"instances[{i}].{name}", "range",
                                      f"{name}={value} is outside [{_num(lo)}, {_num(hi)}]")
            row.append(float(value))
        append(row)
    return rows


def _key_error(i: int, item: dict, names: list[str]) -> None:
    for name in names:
        if name not in item:
            raise ValidationError(f"instances[{i}].{name}", "required", f"{name} is required")
    extra = sorted(str(k) for k in item if k not in names)
    raise ValidationError(_member(f"instances[{i}]", extra[0]), "unknown_field",
                          f"unknown field {extra[0]!r}; expected only {', '.join(names)}")


def _member(prefix: str, key: str) -> str:
    """JSON path of an object member: a.b for plain names, a["odd key"] otherwise."""
    if key.isidentifier():
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{json.dumps(key)}]"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _num(x: float) -> str:
    return str(int(x)) if x.is_integer() else str(x)
