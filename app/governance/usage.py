"""Usage reports: per tenant, model and day, from the audit trail's inference records.

Counts and sums are aggregated in SQL on both engines. The latency percentiles are
`percentile_cont` in PostgreSQL; SQLite has no percentile function, so there they are computed
here with numpy's linear interpolation, which is the same definition, over just the latency
column of the selected rows.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import marshmallow as ma
import numpy as np
from sqlalchemy import Integer, case, func, select

from app.extensions import db
from app.governance import blp
from app.governance.audit.models import AuditRecord
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
    day = func.date(AuditRecord.ts)
    keys = (AuditRecord.tenant_id, AuditRecord.model, day)
    conditions = [AuditRecord.kind == "inference", AuditRecord.ts >= since]
    if until is not None:
        conditions.append(AuditRecord.ts < until)
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
    stmt = select(*columns).where(*conditions).group_by(*keys)
    rows = db.session.execute(stmt).all()
    latencies = {} if postgres else _latencies(keys, conditions)
    result = []
    for tenant, model, date, requests, tokens_in, tokens_out, errors, *percentiles in rows:
        if not postgres:
            sample = latencies.get((tenant, model, str(date)), [])
            percentiles = list(np.percentile(sample, [50, 95])) if sample else [None, None]
        p50, p95 = (None if p is None else round(float(p), 3) for p in percentiles)
        result.append(
            {
                "tenant_id": tenant,
                "model": model,
                "day": str(date),
                "requests": int(requests),
                "tokens_in": int(tokens_in),
                "tokens_out": int(tokens_out),
                "errors": int(errors or 0),
                "latency_p50_ms": p50,
                "latency_p95_ms": p95,
            }
        )
    result.sort(key=lambda r: (r["day"], r["tenant_id"] or "", r["model"] or ""))
    return result


def _latencies(keys: tuple[Any, ...], conditions: list[Any]) -> dict[tuple[Any, ...], list[float]]:
    stmt = select(*keys, AuditRecord.latency_ms).where(*conditions, AuditRecord.latency_ms.is_not(None))
    grouped: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for tenant, model, date, latency in db.session.execute(stmt):
        grouped[(tenant, model, str(date))].append(latency)
    return grouped
