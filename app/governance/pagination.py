"""Keyset pagination in the view: `limit` and an opaque `cursor`, newest rows last.

flask-smorest's CursorPage needs `Query.count()`, which SQLAlchemy 2 `select()` lacks; a keyset on
(created_at, id) also stays fast and stable while rows are being added, unlike OFFSET.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

import marshmallow as ma
from sqlalchemy import Select, tuple_

from app.errors import APIError
from app.extensions import db


class PageArgsSchema(ma.Schema):
    limit = ma.fields.Integer(load_default=50, validate=ma.validate.Range(min=1, max=200))
    cursor = ma.fields.String(
        validate=ma.validate.Regexp(r"^[A-Za-z0-9_-]*={0,2}$", error="not a cursor this API returned"),
        metadata={"description": "`next_cursor` of the previous page (opaque, base64url)."},
    )


class PageSchema(ma.Schema):
    """Subclass with a `data` field listing the page's items."""

    next_cursor = ma.fields.String(
        allow_none=True, metadata={"description": "Pass as `cursor` for the next page; null on the last."}
    )


def _encode(row: Any) -> str:
    return base64.urlsafe_b64encode(f"{row.created_at.isoformat()}|{row.id}".encode()).decode()


def _decode(cursor: str) -> tuple[datetime, str]:
    try:
        created, _, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), row_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise APIError(400, "Invalid cursor.", param="cursor", code="invalid_cursor") from None


def paginate(stmt: Select, model: type[Any], limit: int, cursor: str | None) -> dict[str, Any]:
    if cursor:
        created, row_id = _decode(cursor)
        stmt = stmt.where(tuple_(model.created_at, model.id) > tuple_(created, row_id))
    rows = list(db.session.scalars(stmt.order_by(model.created_at, model.id).limit(limit + 1)))
    return {"data": rows[:limit], "next_cursor": _encode(rows[limit - 1]) if len(rows) > limit else None}
