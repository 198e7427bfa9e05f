"""GET /v1/governance/usage: per tenant, model and day.

Whole UTC days come from the per-day totals (rollup.py), so a report costs the same however many
records its window holds; their latency percentiles are estimated from the day's histogram
(within 2.2%). A window that starts or ends inside a day (the default, 30 days back from now,
does) counts that day's records from the audit trail itself, exactly: counts and sums in SQL,
percentiles with `percentile_cont` on PostgreSQL and numpy's linear interpolation (the same
definition) on SQLite, which has no percentile function. Only that partial day's rows are read.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import marshmallow as ma
import numpy as np
from sqlalchemy import Integer, case, func, select

from app.extensions import db
from app.governance import blp
from app.governance.audit.models import AuditRecord
from app.governance.usage import rollup
from app.governance.usage.rollup import UsageDaily, UsageLatency
from app.identity import scopes as sc
from app.identity.models import utcnow
from app.identity.principal import require_scopes
from app.identity.scoping import tenant_scope
from app.timestamps import as_utc

DEFAULT_WINDOW = timedelta(days=30)


class UsageArgsSchema(ma.Schema):
    since = ma.fields.AwareDateTime(
        default_timezone=UTC, metadata={"description": "ISO 8601, inclusive; default 30 days ago."}
    )
    until = ma.fields.AwareDateTime(default_timezone=UTC, metadata={"description": "ISO 8601, exclusive."})
    tenant_id = ma.fields.String(metadata={"description": "Platform admin only; others see their tenant."})
    group_by = ma.fields.String(load_default="day", validate=ma.validate.OneOf(["day"]))


class UsageRowSchema(ma.Schema):
    tenant_id = ma.fields.String(allow_none=True)
    model = ma.fields.String(allow_none=True)
    day = ma.fields.String(metadata={"description": "UTC date, YYYY-MM-DD."})
    requests = ma.fields.Integer()
    tokens_in = ma.fields.Integer()
    tokens_out = ma.fields.Integer()
    errors = ma.fields.Integer(metadata={"description": "Requests answered with status >= 400."})
    latency_p50_ms = ma.fields.Float(allow_none=True)
    latency_p95_ms = ma.fields.Float(allow_none=True)


class UsageReportSchema(ma.Schema):
    since = ma.fields.DateTime()
    until = ma.fields.DateTime(allow_none=True)
    group_by = ma.fields.String()
    data = ma.fields.List(ma.fields.Nested(UsageRowSchema))


@blp.route("/v1/governance/usage", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(UsageArgsSchema, location="query")
@blp.response(200, UsageReportSchema)
def usage_report(args: dict[str, Any]) -> dict[str, Any]:
    """Usage per tenant, model and day

    Requests, tokens in and out, errors and p50/p95 latency of inference calls. A platform admin
    sees every tenant (or the one named); anyone else sees their own tenant.
    """
    return usage_for(args)


def usage_for(args: dict[str, Any]) -> dict[str, Any]:
    """The caller's usage report for loaded `UsageArgsSchema` args (the API and the console)."""
    tenant_id = tenant_scope(args.get("tenant_id"))
    # Echoed in UTC like every timestamp the gateway writes, whatever offset the caller used.
    since = as_utc(args["since"]) if args.get("since") else utcnow() - DEFAULT_WINDOW
    until = as_utc(args["until"]) if args.get("until") else None
    data = report(since, until, tenant_id)
    return {"since": since, "until": until, "group_by": args["group_by"], "data": data}


def report(since: datetime, until: datetime | None, tenant_id: str | None) -> list[dict[str, Any]]:
    since = as_utc(since)
    until = None if until is None else as_utc(until)
    if until is not None and until <= since:
        return []
    first_whole = since.date() if since == _midnight(since) else since.date() + timedelta(days=1)
    whole_until = None if until is None else until.date()  # exclusive
    result = []
    if since != _midnight(since):
        head_end = _midnight(since) + timedelta(days=1)
        result += _from_records(since, head_end if until is None else min(until, head_end), tenant_id)
    if until is not None and until != _midnight(until) and until.date() >= first_whole:
        result += _from_records(_midnight(until), until, tenant_id)
    if whole_until is None or first_whole < whole_until:
        result += _from_totals(first_whole, whole_until, tenant_id)
    result.sort(key=lambda r: (r["day"], r["tenant_id"] or "", r["model"] or ""))
    return result


def _midnight(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _row(key: tuple[Any, ...], sums: tuple[Any, ...], percentiles: list[Any]) -> dict[str, Any]:
    tenant, model, day = key
    requests, tokens_in, tokens_out, errors = sums
    p50, p95 = (None if p is None else round(float(p), 3) for p in percentiles)
    return {
        "tenant_id": tenant or None,
        "model": model or None,
        "day": str(day),
        "requests": int(requests),
        "tokens_in": int(tokens_in or 0),
        "tokens_out": int(tokens_out or 0),
        "errors": int(errors or 0),
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
    }


def _from_totals(first: date, until: date | None, tenant_id: str | None) -> list[dict[str, Any]]:
    """Whole days [first, until) from the per-day totals and histograms."""

    def where(table: Any) -> list[Any]:
        conditions = [table.c.day >= first]
        if until is not None:
            conditions.append(table.c.day < until)
        if tenant_id is not None:
            conditions.append(table.c.tenant_id == tenant_id)
        return conditions

    daily, latency = UsageDaily.__table__, UsageLatency.__table__
    histograms: dict[tuple[Any, ...], dict[int, int]] = defaultdict(dict)
    stmt = select(latency.c.tenant_id, latency.c.model, latency.c.day, latency.c.bucket, latency.c.count)
    for tenant, model, day, index, count in db.session.execute(stmt.where(*where(latency))):
        histograms[(tenant, model, day)][index] = count
    stmt = select(
        daily.c.tenant_id,
        daily.c.model,
        daily.c.day,
        daily.c.requests,
        daily.c.tokens_in,
        daily.c.tokens_out,
        daily.c.errors,
    )
    result = []
    for tenant, model, day, *sums in db.session.execute(stmt.where(*where(daily))):
        histogram = histograms.get((tenant, model, day), {})
        percentiles = [rollup.percentile(histogram, 50), rollup.percentile(histogram, 95)]
        result.append(_row((tenant, model, day), tuple(sums), percentiles))
    return result


def _from_records(start: datetime, end: datetime, tenant_id: str | None) -> list[dict[str, Any]]:
    """[start, end), inside one day, from the audit records themselves."""
    day = func.date(AuditRecord.ts)
    keys = (AuditRecord.tenant_id, AuditRecord.model, day)
    conditions = [AuditRecord.kind == "inference", AuditRecord.ts >= start, AuditRecord.ts < end]
    if tenant_id is not None:
        conditions.append(AuditRecord.tenant_id == tenant_id)
    postgres = db.engine.dialect.name == "postgresql"
    columns: list[Any] = [
        *keys,
        func.count(),
        func.coalesce(func.sum(AuditRecord.tokens_in), 0),
        func.coalesce(func.sum(AuditRecord.tokens_out), 0),
        func.sum(case((AuditRecord.status >= 400, 1), else_=0), type_=Integer),
    ]
    if postgres:
        columns += [
            func.percentile_cont(0.5).within_group(AuditRecord.latency_ms),
            func.percentile_cont(0.95).within_group(AuditRecord.latency_ms),
        ]
    rows = db.session.execute(select(*columns).where(*conditions).group_by(*keys)).all()
    latencies = {} if postgres else _latencies(keys, conditions)
    result = []
    for tenant, model, date_, requests, tokens_in, tokens_out, errors, *percentiles in rows:
        if not postgres:
            sample = latencies.get((tenant, model, str(date_)), [])
            percentiles = list(np.percentile(sample, [50, 95])) if sample else [None, None]
        result.append(_row((tenant, model, date_), (requests, tokens_in, tokens_out, errors), percentiles))
    return result


def _latencies(keys: tuple[Any, ...], conditions: list[Any]) -> dict[tuple[Any, ...], list[float]]:
    stmt = select(*keys, AuditRecord.latency_ms).where(*conditions, AuditRecord.latency_ms.is_not(None))
    grouped: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for tenant, model, date_, latency in db.session.execute(stmt):
        grouped[(tenant, model, str(date_))].append(latency)
    return grouped
