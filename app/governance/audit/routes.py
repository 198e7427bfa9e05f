"""Reading the audit trail: filtered pages, streamed exports, chain verification.

Tenant isolation is built into the queries (`scoped_select`): a tenant's principals only ever
read their tenant's records and chain. A named tenant goes through `tenant_scope`, the rule every
governance route shares.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import marshmallow as ma
from flask import Response, stream_with_context
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.errors import APIError
from app.extensions import db
from app.governance import blp
from app.governance.audit.models import AuditRecord
from app.governance.audit.records import canonical_json
from app.governance.audit.verify import all_chains, verify
from app.governance.pagination import PageArgsSchema, PageSchema
from app.identity import scopes as sc
from app.identity.principal import require_scopes
from app.identity.scoping import scoped_select, tenant_scope

EXPORT_CHUNK = 1000
EXPORT_COLUMNS: tuple[str, ...] = tuple(c.name for c in AuditRecord.__table__.columns)


class AuditFilterSchema(ma.Schema):
    since = ma.fields.AwareDateTime(default_timezone=UTC, metadata={"description": "ISO 8601, inclusive."})
    until = ma.fields.AwareDateTime(default_timezone=UTC, metadata={"description": "ISO 8601, exclusive."})
    tenant_id = ma.fields.String(metadata={"description": "Platform admin only; others see their tenant."})
    model = ma.fields.String()
    status = ma.fields.Integer(validate=ma.validate.Range(min=100, max=599))
    principal = ma.fields.String(metadata={"description": "e.g. `key:<id>` or `user:<id>`."})
    kind = ma.fields.String(validate=ma.validate.OneOf(["inference", "admin"]))


class AuditPageArgsSchema(PageArgsSchema, AuditFilterSchema):
    pass


class ExportArgsSchema(AuditFilterSchema):
    format = ma.fields.String(load_default="jsonl", validate=ma.validate.OneOf(["jsonl", "csv"]))


class VerifyArgsSchema(ma.Schema):
    tenant_id = ma.fields.String(metadata={"description": "Platform admin: check only this tenant's chain."})


class AuditRecordSchema(ma.Schema):
    record_id = ma.fields.String()
    chain = ma.fields.String()
    seq = ma.fields.Integer()
    ts = ma.fields.DateTime()
    kind = ma.fields.String()
    request_id = ma.fields.String(allow_none=True)
    tenant_id = ma.fields.String(allow_none=True)
    principal = ma.fields.String(allow_none=True)
    endpoint = ma.fields.String(allow_none=True)
    method = ma.fields.String(allow_none=True)
    action = ma.fields.String(allow_none=True)
    model = ma.fields.String(allow_none=True)
    model_version = ma.fields.String(allow_none=True)
    policy_version = ma.fields.Integer(allow_none=True)
    decision = ma.fields.String(allow_none=True)
    detectors = ma.fields.List(ma.fields.String(), allow_none=True)
    status = ma.fields.Integer(allow_none=True)
    latency_ms = ma.fields.Float(allow_none=True)
    tokens_in = ma.fields.Integer(allow_none=True)
    tokens_out = ma.fields.Integer(allow_none=True)
    input_sha256 = ma.fields.String(allow_none=True)
    output_sha256 = ma.fields.String(allow_none=True)
    raw_input = ma.fields.String(allow_none=True, metadata={"description": "Only if the tenant opted in."})
    raw_output = ma.fields.String(allow_none=True, metadata={"description": "Only if the tenant opted in."})
    details = ma.fields.Dict(allow_none=True)
    prev_hash = ma.fields.String()
    hash = ma.fields.String()


class AuditPageSchema(PageSchema):
    data = ma.fields.List(ma.fields.Nested(AuditRecordSchema))


class BrokenLinkSchema(ma.Schema):
    chain = ma.fields.String()
    seq = ma.fields.Integer()
    record_id = ma.fields.String(allow_none=True)
    reason = ma.fields.String()


class VerifySchema(ma.Schema):
    ok = ma.fields.Boolean()
    chains = ma.fields.Integer(metadata={"description": "Chains checked."})
    records = ma.fields.Integer(metadata={"description": "Records checked before any break."})
    broken = ma.fields.List(
        ma.fields.Nested(BrokenLinkSchema), metadata={"description": "The first broken link of each chain."}
    )


def filtered(args: dict[str, Any]) -> Select:
    stmt = scoped_select(AuditRecord, tenant_id=args.get("tenant_id"))
    if args.get("since"):
        stmt = stmt.where(AuditRecord.ts >= args["since"])
    if args.get("until"):
        stmt = stmt.where(AuditRecord.ts < args["until"])
    for name in ("model", "status", "principal", "kind"):
        if args.get(name) is not None:
            stmt = stmt.where(getattr(AuditRecord, name) == args[name])
    return stmt


def _encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(str(row_id).encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        return int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise APIError(400, "Invalid cursor.", param="cursor", code="invalid_cursor") from None


@blp.route("/v1/governance/audit", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(AuditPageArgsSchema, location="query")
@blp.response(200, AuditPageSchema)
def list_audit(args: dict[str, Any]) -> dict[str, Any]:
    """List audit records, oldest first

    Filters combine with AND. Pages follow the records' insertion order (a keyset on the row id),
    so a page never shifts while new records are written.
    """
    return audit_page(args)


def audit_page(args: dict[str, Any]) -> dict[str, Any]:
    """One page of the records the caller may read, for loaded `AuditPageArgsSchema` args."""
    stmt = filtered(args)
    if args.get("cursor"):
        stmt = stmt.where(AuditRecord.id > _decode_cursor(args["cursor"]))
    limit = args["limit"]
    rows = list(db.session.scalars(stmt.order_by(AuditRecord.id).limit(limit + 1)))
    return {
        "data": rows[:limit],
        "next_cursor": _encode_cursor(rows[limit - 1].id) if len(rows) > limit else None,
    }


def _export_value(value: Any) -> Any:
    """CSV cells; JSON lines keep dicts and lists as JSON. Timestamps are RFC 3339 with their
    offset (`+00:00`), as on every route; canonical_json alone would write the hash input's form."""
    if isinstance(value, datetime):
        return value.isoformat(timespec="microseconds")
    if isinstance(value, dict | list):
        return canonical_json(value)
    return value


@blp.route("/v1/governance/audit/export", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(ExportArgsSchema, location="query")
@blp.response(200, description="JSON lines or CSV, streamed; every column, hashes included.")
def export_audit(args: dict[str, Any]) -> Response:
    """Export audit records (streamed JSONL or CSV)

    Every column is exported, `prev_hash` and `hash` included, so an export of a whole chain can
    be verified offline. Rows are read in chunks, each in a short transaction of its own, so a
    long download holds no database connection between chunks.
    """
    stmt = filtered(args)
    fmt = args["format"]
    engine = db.engine

    def chunks() -> Iterator[str]:
        last_id = 0
        if fmt == "csv":
            yield _csv_line(EXPORT_COLUMNS)
        while True:
            with Session(engine) as session:
                page = stmt.where(AuditRecord.id > last_id).order_by(AuditRecord.id).limit(EXPORT_CHUNK)
                rows = list(session.scalars(page))
            if not rows:
                return
            for row in rows:
                values = {name: getattr(row, name) for name in EXPORT_COLUMNS}
                if fmt == "csv":
                    yield _csv_line([_export_value(values[name]) for name in EXPORT_COLUMNS])
                else:
                    values["ts"] = _export_value(values["ts"])
                    yield canonical_json(values) + "\n"
            last_id = rows[-1].id

    mimetype = "text/csv" if fmt == "csv" else "application/x-ndjson"
    return Response(
        stream_with_context(chunks()),
        mimetype=mimetype,
        headers={"Content-Disposition": f'attachment; filename="audit.{fmt}"', "Cache-Control": "no-store"},
    )


def _csv_line(values: Any) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue()


@blp.route("/v1/governance/audit/verify", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(VerifyArgsSchema, location="query")
@blp.response(200, VerifySchema)
def verify_audit(args: dict[str, Any]) -> dict[str, Any]:
    """Verify the hash chains

    A platform admin checks every chain (or one tenant's); anyone else checks their tenant's.
    `ok` is false when a chain is broken, and `broken` names the first broken link of each.
    """
    return verify_for(args.get("tenant_id"))


def verify_for(requested_tenant: str | None) -> dict[str, Any]:
    """Verify the chains the caller may read: an admin's all (or one tenant's), else its own."""
    tenant_id = tenant_scope(requested_tenant)
    with db.engine.connect() as conn:
        return verify(conn, all_chains(conn) if tenant_id is None else [tenant_id])
