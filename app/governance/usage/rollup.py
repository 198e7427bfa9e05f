"""Per-day usage totals, kept beside the audit trail so a usage report never rescans it.

A report used to aggregate the inference records of its window on every read: O(records), with
a sort for the percentiles. A 30-day window of a busy tenant is millions of rows, and a dashboard
polling it can keep a database core busy (bench/soak.py measured 550 ms per read eight minutes
in, and reads that crowded out the audit writer itself). So the audit writer adds each batch's
inference records to two small tables in the transaction that inserts them:

- `usage_daily`: requests, tokens in and out, errors per (tenant, model, UTC day);
- `usage_latency`: a latency histogram per (tenant, model, day), in logarithmic buckets of
  2^(1/16) (4.4% wide), from which p50 and p95 are estimated (within 2.2% of the exact value).

Because both are written with the records, in the same transaction, the totals are exactly the
records' (a replayed or recovered batch counts once, as its records do), and a failed write
changes neither. A record without a tenant or a model is kept under '' (NULLs never conflict in
a unique key, so they could not be upserted) and reported as null.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from typing import Any

from sqlalchemy import BigInteger, Connection, Date, Integer, String
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timestamps import as_utc

BUCKETS_PER_DOUBLING = 16
# The bucket of a zero (or negative) latency: below every real one.
ZERO_BUCKET = -10_000


class UsageDaily(db.Model):
    __tablename__ = "usage_daily"

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True, doc="'' for no tenant")
    model: Mapped[str] = mapped_column(String(128), primary_key=True, doc="'' for no model")
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    tokens_in: Mapped[int] = mapped_column(BigInteger)
    tokens_out: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)


class UsageLatency(db.Model):
    __tablename__ = "usage_latency"

    tenant_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    bucket: Mapped[int] = mapped_column(Integer, primary_key=True, doc="floor(16 * log2(latency_ms))")
    count: Mapped[int] = mapped_column(BigInteger)


_daily = UsageDaily.__table__
_latency = UsageLatency.__table__
Key = tuple[str, str, date]


def bucket(latency_ms: float) -> int:
    return ZERO_BUCKET if latency_ms <= 0 else math.floor(BUCKETS_PER_DOUBLING * math.log2(latency_ms))


def bucket_value(index: int) -> float:
    """The geometric middle of a bucket: at most half a bucket (2.2%) from any value in it."""
    return 0.0 if index == ZERO_BUCKET else 2 ** ((index + 0.5) / BUCKETS_PER_DOUBLING)


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """numpy's default (linear) percentile, with each value read as its bucket's middle."""
    total = sum(histogram.values())
    if total == 0:
        return None
    indexes = sorted(histogram)
    ends: list[int] = []  # ends[i]: how many values lie in buckets up to indexes[i]
    for index in indexes:
        ends.append((ends[-1] if ends else 0) + histogram[index])

    def value_at(rank: int) -> float:
        return bucket_value(indexes[bisect_left(ends, rank + 1)])

    rank = q / 100 * (total - 1)
    low = math.floor(rank)
    below, above = value_at(low), value_at(min(low + 1, total - 1))
    return below + (rank - low) * (above - below)


def _key(row: Mapping[str, Any]) -> Key:
    return (row.get("tenant_id") or "", row.get("model") or "", as_utc(row["ts"]).date())


def totals(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[Key, list[int]], dict[tuple[Key, int], int]]:
    """A batch of audit rows as (per-day totals, per-day latency bucket counts); inference only."""
    daily: dict[Key, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    latency: dict[tuple[Key, int], int] = defaultdict(int)
    for row in rows:
        if row.get("kind") != "inference":
            continue
        key = _key(row)
        sums = daily[key]
        sums[0] += 1
        sums[1] += row.get("tokens_in") or 0
        sums[2] += row.get("tokens_out") or 0
        sums[3] += 1 if (row.get("status") or 0) >= 400 else 0
        if row.get("latency_ms") is not None:
            latency[(key, bucket(row["latency_ms"]))] += 1
    return daily, latency


def _daily_rows(daily: dict[Key, list[int]]) -> list[dict[str, Any]]:
    return [
        {"tenant_id": t, "model": m, "day": d, "requests": r, "tokens_in": i, "tokens_out": o, "errors": e}
        for (t, m, d), (r, i, o, e) in sorted(daily.items())
    ]


def _latency_rows(latency: dict[tuple[Key, int], int]) -> list[dict[str, Any]]:
    return [
        {"tenant_id": t, "model": m, "day": d, "bucket": b, "count": n}
        for ((t, m, d), b), n in sorted(latency.items())
    ]


def add(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add audit rows to the totals, in the caller's transaction (the one inserting them).

    No lock order to keep: a tenant's totals are only written by a transaction that appends to
    its audit chain (which the head row's lock, or its seq's uniqueness, serialises)."""
    daily, latency = totals(rows)
    if not daily:
        return
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    add_daily = insert(_daily)
    sums = ("requests", "tokens_in", "tokens_out", "errors")
    conn.execute(
        add_daily.on_conflict_do_update(
            index_elements=["tenant_id", "model", "day"],
            set_={name: _daily.c[name] + add_daily.excluded[name] for name in sums},
        ),
        _daily_rows(daily),
    )
    if latency:
        add_latency = insert(_latency)
        conn.execute(
            add_latency.on_conflict_do_update(
                index_elements=["tenant_id", "model", "day", "bucket"],
                set_={"count": _latency.c.count + add_latency.excluded.count},
            ),
            _latency_rows(latency),
        )


# PostgreSQL, for the writer's one-statement append: the same upserts as CTEs over JSON
# parameters (:usage_daily, :usage_latency), so the statement's text never changes with the batch.
POSTGRES_CTES = """\
usage_daily_added AS (
  INSERT INTO usage_daily (tenant_id, model, day, requests, tokens_in, tokens_out, errors)
  SELECT tenant_id, model, day, requests, tokens_in, tokens_out, errors
  FROM json_to_recordset(CAST(:usage_daily AS json)) AS d(
    tenant_id varchar, model varchar, day date, requests bigint, tokens_in bigint, tokens_out bigint,
    errors bigint)
  ON CONFLICT (tenant_id, model, day) DO UPDATE SET
    requests = usage_daily.requests + EXCLUDED.requests,
    tokens_in = usage_daily.tokens_in + EXCLUDED.tokens_in,
    tokens_out = usage_daily.tokens_out + EXCLUDED.tokens_out,
    errors = usage_daily.errors + EXCLUDED.errors
),
usage_latency_added AS (
  INSERT INTO usage_latency (tenant_id, model, day, bucket, count)
  SELECT tenant_id, model, day, bucket, count
  FROM json_to_recordset(CAST(:usage_latency AS json)) AS l(
    tenant_id varchar, model varchar, day date, bucket integer, count bigint)
  ON CONFLICT (tenant_id, model, day, bucket) DO UPDATE SET count = usage_latency.count + EXCLUDED.count
)"""


def postgres_params(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The JSON parameters of POSTGRES_CTES for a batch of audit rows."""
    daily, latency = totals(rows)
    return {
        "usage_daily": json.dumps(_daily_rows(daily), default=str),
        "usage_latency": json.dumps(_latency_rows(latency), default=str),
    }
