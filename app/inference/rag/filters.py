"""Metadata filters for search: one small language, checked once, applied by every store alike.

A filter is an object of conditions on metadata keys, all of which must hold:

    {"lang": "en", "year": {"$gte": 2020}, "kind": {"$in": ["faq", "guide"]}}

- a scalar (string, number, boolean) is equality; `{"$eq": v}` says the same;
- `{"$ne": v}`: the key is missing or holds another value;
- `{"$in": [v, ...]}`: equal to one of up to 64 scalars;
- `{"$gt" | "$gte" | "$lt" | "$lte": number}`: a numeric comparison; a key that is missing or
  not a number never matches.

Booleans are not numbers here (`true` never equals `1`), as in JSON. Anything else (a nested
object, an unknown operator, a list outside `$in`, more than 16 conditions) is refused with
400 `invalid_filter` naming the offending key, never ignored: a filter silently dropped would
return chunks the caller meant to exclude.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Any

from app.errors import APIError

KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_CONDITIONS = 16
MAX_IN_VALUES = 64
COMPARISONS = ("$gt", "$gte", "$lt", "$lte")
OPERATORS = ("$eq", "$ne", "$in", *COMPARISONS)
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Condition:
    key: str
    op: str  # one of OPERATORS
    value: Any  # a scalar, a tuple of scalars ($in) or a float (comparisons)


def _invalid(key: str | None, message: str) -> APIError:
    param = f"filter.{key}" if key else "filter"
    return APIError(400, message, code="invalid_filter", param=param)


def is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or (isinstance(value, numbers.Real) and value == value)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse(raw: Any) -> tuple[Condition, ...]:
    """The conditions of a request's `filter` (None: no filter), or 400 invalid_filter."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise _invalid(None, "filter must be an object of metadata conditions.")
    if len(raw) > MAX_CONDITIONS:
        raise _invalid(None, f"filter has {len(raw)} conditions; at most {MAX_CONDITIONS} are allowed.")
    conditions = []
    for key, spec in raw.items():
        if not KEY.match(key):
            raise _invalid(key, "Metadata keys are 1-64 characters of letters, digits and _ . : -")
        if is_scalar(spec):
            conditions.append(Condition(key, "$eq", spec))
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            raise _invalid(key, "A condition is a scalar, or an object with exactly one operator.")
        op, value = next(iter(spec.items()))
        if op not in OPERATORS:
            raise _invalid(key, f"Unknown operator {op!r}; use one of {', '.join(OPERATORS)}.")
        if op == "$in":
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN_VALUES:
                raise _invalid(key, f"$in takes a list of 1 to {MAX_IN_VALUES} scalars.")
            if not all(is_scalar(v) for v in value):
                raise _invalid(key, "$in takes scalars only (strings, numbers, booleans).")
            conditions.append(Condition(key, op, tuple(value)))
        elif op in COMPARISONS:
            if not is_number(value):
                raise _invalid(key, f"{op} compares numbers; got {type(value).__name__}.")
            conditions.append(Condition(key, op, float(value)))
        else:
            if not is_scalar(value):
                raise _invalid(key, f"{op} takes a scalar (string, number, boolean).")
            conditions.append(Condition(key, op, value))
    return tuple(conditions)


def _equal(stored: Any, wanted: Any) -> bool:
    """JSON equality: a boolean equals only a boolean, a number only a number (1 == 1.0)."""
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return isinstance(stored, bool) and isinstance(wanted, bool) and stored == wanted
    if is_number(stored) and is_number(wanted):
        return float(stored) == float(wanted)
    return type(stored) is type(wanted) and stored == wanted


def matches(metadata: dict[str, Any], conditions: tuple[Condition, ...]) -> bool:
    """Whether one chunk's metadata satisfies every condition (the in-process stores' evaluator)."""
    for condition in conditions:
        present = condition.key in metadata
        stored = metadata.get(condition.key)
        if condition.op == "$eq":
            ok = present and _equal(stored, condition.value)
        elif condition.op == "$ne":
            ok = not (present and _equal(stored, condition.value))
        elif condition.op == "$in":
            ok = present and any(_equal(stored, v) for v in condition.value)
        else:
            ok = present and is_number(stored) and _compare(condition.op, float(stored), condition.value)
        if not ok:
            return False
    return True


def _compare(op: str, stored: float, wanted: float) -> bool:
    if op == "$gt":
        return stored > wanted
    if op == "$gte":
        return stored >= wanted
    if op == "$lt":
        return stored < wanted
    return stored <= wanted
