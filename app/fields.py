"""JSON-body fields that accept exactly what the OpenAPI document says they accept.

marshmallow is lenient by default: `Boolean` takes 0, 1, "yes" and "on", `Integer` takes "5"
and 5.0 (and `True`, a Python int). The document says `boolean` and `integer`, so clients that
follow it (and schemathesis, which checks it) expect those to be refused. Query strings are
text, so these fields are for JSON bodies only.
"""

from __future__ import annotations

import numbers
from typing import Any

import marshmallow as ma

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StrictBoolean(ma.fields.Boolean):
    """A JSON boolean: marshmallow's Boolean takes "yes", "on" and 1 for true."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise ma.ValidationError("Must be a boolean.")
        return value


class StrictInteger(ma.fields.Integer):
    """A JSON integer, bounded (int64 unless narrower): no strings, floats or booleans (bool is an
    int in Python). `validate` adds validators to the bounds."""

    def __init__(
        self,
        *,
        minimum: int = INT64_MIN,
        maximum: int = INT64_MAX,
        validate: Any = None,
        **kwargs: Any,
    ) -> None:
        extra = (
            [] if validate is None else list(validate) if isinstance(validate, list | tuple) else [validate]
        )
        bounds = ma.validate.Range(min=minimum, max=maximum)
        super().__init__(strict=True, validate=[bounds, *extra], **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ma.ValidationError("Must be an integer.")
        return int(value)


class StrictNumber(ma.fields.Float):
    """A JSON number: no strings or booleans."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ma.ValidationError("Must be a number.")
        return super()._deserialize(value, attr, data, **kwargs)
