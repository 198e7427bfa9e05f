"""Timestamps: timezone-aware UTC in Python and on the wire, naive UTC in the database.

Every `Mapped[datetime]` column is a `UTCDateTime` (see `Base.type_annotation_map` in
app/extensions.py). SQLite has no time zone type and drops tzinfo, and the columns are
`timestamp without time zone` on PostgreSQL, so a plain DateTime hands back naive values that
serialise as `2026-12-02T21:50:05.452199`, which `format: date-time` (RFC 3339) does not allow.
The type stores UTC without an offset, exactly what the columns have always held (no migration,
no rewrite of existing rows), and returns aware UTC datetimes on both engines, so a route's
`created_at` reads `...+00:00` and Python code never compares naive with aware values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Aware UTC; a naive value is taken to be UTC already (what the database holds)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)
