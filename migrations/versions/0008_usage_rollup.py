"""usage rollup: per-day totals and latency histograms beside the audit trail

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 01:40:00.000000

Usage reports read these instead of rescanning the audit records (app/governance/usage/rollup.py);
the audit writer keeps them in the transaction that inserts the records. The upgrade fills them
from the records already there.
"""

import math
from collections import defaultdict
from datetime import date, datetime

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# A frozen copy of rollup.bucket(): a migration must give the same result whatever the app becomes.
BUCKETS_PER_DOUBLING = 16
ZERO_BUCKET = -10_000


def _bucket(latency_ms: float) -> int:
    return ZERO_BUCKET if latency_ms <= 0 else math.floor(BUCKETS_PER_DOUBLING * math.log2(latency_ms))


def _day(ts: object) -> date:
    return (ts if isinstance(ts, datetime) else datetime.fromisoformat(str(ts))).date()


def upgrade():
    daily_table = op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens_in", sa.BigInteger(), nullable=False),
        sa.Column("tokens_out", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "model", "day"),
    )
    latency_table = op.create_table(
        "usage_latency",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "model", "day", "bucket"),
    )
    # Stored naive UTC, as every timestamp; timestamps are read as they are, days taken in UTC.
    records = sa.table(
        "audit_records",
        sa.column("kind"),
        sa.column("ts"),
        sa.column("tenant_id"),
        sa.column("model"),
        sa.column("status"),
        sa.column("latency_ms"),
        sa.column("tokens_in"),
        sa.column("tokens_out"),
    )
    daily: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    latency: dict[tuple, int] = defaultdict(int)
    stmt = sa.select(
        records.c.ts,
        records.c.tenant_id,
        records.c.model,
        records.c.status,
        records.c.latency_ms,
        records.c.tokens_in,
        records.c.tokens_out,
    ).where(records.c.kind == "inference")
    # On the statement: a connection's execution options would outlive it (alembic's own UPDATE).
    result = op.get_bind().execute(stmt.execution_options(yield_per=10_000))
    for ts, tenant, model, status, latency_ms, tokens_in, tokens_out in result:
        key = (tenant or "", model or "", _day(ts))
        sums = daily[key]
        sums[0] += 1
        sums[1] += tokens_in or 0
        sums[2] += tokens_out or 0
        sums[3] += 1 if (status or 0) >= 400 else 0
        if latency_ms is not None:
            latency[(*key, _bucket(latency_ms))] += 1
    if daily:
        op.bulk_insert(
            daily_table,
            [
                {
                    "tenant_id": t,
                    "model": m,
                    "day": d,
                    "requests": r,
                    "tokens_in": i,
                    "tokens_out": o,
                    "errors": e,
                }
                for (t, m, d), (r, i, o, e) in daily.items()
            ],
        )
    if latency:
        op.bulk_insert(
            latency_table,
            [
                {"tenant_id": t, "model": m, "day": d, "bucket": b, "count": n}
                for (t, m, d, b), n in latency.items()
            ],
        )


def downgrade():
    op.drop_table("usage_latency")
    op.drop_table("usage_daily")
