"""JSON-body fields that accept exactly what the OpenAPI document says they accept.

marshmallow is lenient by default: `Boolean` takes 0, 1, "yes" and "on", `Integer` takes "5"
and 5.0 (and `True`, a Python int). The document says `boolean` and `integer`, so clients that
follow it (and schemathesis, which checks it) expect those to be refused. Query strings are
text, so these fields are for JSON bodies only.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma


class StrictBoolean(ma.fields.Boolean):
    """JSON `true` or `false`, nothing else."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class StrictInteger(ma.fields.Integer):
    """A JSON integer: no strings, no floats, no booleans."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._deserialize(value, attr, data, **kwargs)
