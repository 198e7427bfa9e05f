"""What one audit record holds, and how its hash is computed.

A record is first a `Pending` (references to the request and response bodies, captured in
`after_request`) and becomes a row when the response has been fully sent, so hashing the bodies
never delays the client. `row()` gives every column except `seq`, `prev_hash` and `hash`, which the
writer assigns while it holds the chain head; `record_hash` is SHA-256 over the canonical JSON of
all the other columns.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import String

from app.governance.audit.models import AuditRecord
from app.timestamps import as_utc

GENESIS_HASH = "0" * 64
# Records without a tenant (a failed token request, an action of a tenantless caller).
PLATFORM_CHAIN = "platform"
# Everything but the surrogate key and the hash itself is covered by the hash.
HASHED_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in AuditRecord.__table__.columns if c.name not in ("id", "hash")
)
# What a record is before the writer links it into its chain (and what the spool holds).
ROW_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in AuditRecord.__table__.columns if c.name not in ("id", "seq", "prev_hash", "hash")
)
_STRING_LIMITS: dict[str, int] = {
    c.name: c.type.length
    for c in AuditRecord.__table__.columns
    if isinstance(c.type, String) and c.type.length is not None
}
# Form fields of the token endpoint that say who asked, never a secret.
SAFE_FORM_FIELDS = ("grant_type", "username", "client_id", "scope")


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        # Hashed as naive UTC, the form every record has been hashed in since the first: records
        # hashed before timestamps became timezone-aware still verify. Exports (and offline
        # verifiers) show `...+00:00`; parsed back to a datetime, it hashes the same.
        return as_utc(value).replace(tzinfo=None).isoformat(timespec="microseconds")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return sorted(value) if isinstance(value, set | frozenset) else list(value)
    return str(value)


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 as is: the same object always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_hash(fields: Mapping[str, Any]) -> str:
    """The hash of a record (a row from the database, or one about to be inserted)."""
    return sha256_hex(canonical_json({name: fields.get(name) for name in HASHED_COLUMNS}))


def chain_for(tenant_id: str | None) -> str:
    return tenant_id or PLATFORM_CHAIN


def _without_nul(value: Any) -> Any:
    """PostgreSQL's text can't hold U+0000 (nor can its JSON functions turn a \\u0000 into text),
    and a client can put one in any string it sends (a message, a model name, a path as %00): stored
    as is, it would fail its whole batch on PostgreSQL, forever, and with it every later record of
    the buffer. So NULs become U+FFFD, the replacement character, before hashing, on every database
    alike; input_sha256 and output_sha256 are taken before, over the content as it was, so what was
    sent and answered stays provable."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _clip(name: str, value: Any) -> Any:
    """A value too long for its column would fail its whole batch on PostgreSQL, forever."""
    value = _without_nul(value)
    limit = _STRING_LIMITS.get(name)
    if limit is not None and isinstance(value, str) and len(value) > limit:
        return value[:limit]
    return value


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _json_value(raw: bytes) -> Any:
    """A body as JSON if it is JSON, else as text; None when empty."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else canonical_json(value)


def _as_json_safe(value: Any) -> Any:
    """What a JSON column gives back after a round trip (tuples become lists, keys strings)."""
    return None if value is None else json.loads(canonical_json(value))


@dataclass
class Pending:
    """One request's audit data, as captured when its response was fully sent."""

    kind: str
    ts: datetime
    request_id: str | None
    tenant_id: str | None
    principal: str | None
    endpoint: str
    method: str
    action: str | None
    status: int
    latency_ms: float
    noted: dict[str, Any]
    details: dict[str, Any]
    view_args: dict[str, Any]
    served_model: str | None = None
    request_body: bytes = b""
    response_body: bytes = b""
    form: dict[str, str] = field(default_factory=dict)
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    _row: dict[str, Any] | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        """The record's columns, without seq, prev_hash and hash; computed once."""
        if self._row is None:
            self._row = self._build()
            # A buffered record keeps its hashes, not the bodies (an embeddings answer is large).
            self.request_body = self.response_body = b""
        return self._row

    def _build(self) -> dict[str, Any]:
        row = self._inference() if self.kind == "inference" else self._admin()
        row.update(
            record_id=self.record_id,
            ts=self.ts,
            kind=self.kind,
            request_id=self.request_id,
            principal=self.principal,
            endpoint=self.endpoint,
            method=self.method,
            action=self.action,
            status=_int_or_none(self.noted.get("status", self.status)),
            latency_ms=round(self.latency_ms, 3),
        )
        row["chain"] = chain_for(row["tenant_id"])
        row["details"] = _as_json_safe(row.get("details") or None)
        return {name: _clip(name, row.get(name)) for name in ROW_COLUMNS}

    def _inference(self) -> dict[str, Any]:
        """The input hash and raw input are of what the model saw: the (redacted) input the
        service noted, else the request body (a call refused before its policy step; raw content
        needs the opt-in, which only a policy decision carries). A blocked call has neither: no
        model saw anything, and its body holds the very value the policy refused; a hash would
        not hide it either, since a card or social security number can be found by enumeration.
        """
        noted = self.noted
        request_obj = _json_value(self.request_body)
        response_obj = _json_value(self.response_body)
        content_in = None if noted.get("decision") == "block" else noted.get("input", request_obj)
        content_out = noted.get("output", response_obj)
        served_name, _, served_version = (self.served_model or "").partition("/")
        body_model = request_obj.get("model") if isinstance(request_obj, dict) else None
        usage = response_obj.get("usage") if isinstance(response_obj, dict) else None
        usage = usage if isinstance(usage, dict) else {}
        raw = bool(noted.get("raw_opt_in"))
        detectors = noted.get("detectors")
        return {
            "tenant_id": self.tenant_id,
            "model": noted.get("model")
            or served_name
            or self.view_args.get("name")
            or (body_model if isinstance(body_model, str) else None),
            "model_version": noted.get("model_version") or served_version or self.view_args.get("version"),
            "policy_version": _int_or_none(noted.get("policy_version")),
            "decision": noted.get("decision"),
            "detectors": sorted(map(str, detectors)) if detectors is not None else None,
            "tokens_in": _int_or_none(noted.get("tokens_in", usage.get("prompt_tokens"))),
            "tokens_out": _int_or_none(noted.get("tokens_out", usage.get("completion_tokens"))),
            "input_sha256": None if content_in is None else sha256_hex(canonical_json(content_in)),
            "output_sha256": None if content_out is None else sha256_hex(canonical_json(content_out)),
            "raw_input": _as_text(content_in) if raw and content_in is not None else None,
            "raw_output": _as_text(content_out) if raw and content_out is not None else None,
            "details": self.details,
        }

    def _admin(self) -> dict[str, Any]:
        """Who did what to which object; request bodies are never hashed (they carry passwords)."""
        succeeded = (_int_or_none(self.noted.get("status")) or self.status) < 400
        response_obj = _json_value(self.response_body) if succeeded else None
        created = response_obj if isinstance(response_obj, dict) else {}
        # A successful action belongs to the tenant it acted on, so that tenant's admins see it; a
        # refused one stays with the caller's tenant, so it never reveals the caller to its target.
        tenant = self.tenant_id
        if succeeded:
            target_tenant = self.view_args.get("tenant_id") or created.get("tenant_id")
            tenant = target_tenant if isinstance(target_tenant, str) else tenant
        details: dict[str, Any] = dict(self.details)
        if self.view_args:
            details["target"] = self.view_args
        if isinstance(created.get("id"), str):
            details["object_id"] = created["id"]
        if self.form:
            details["form"] = self.form
        if tenant != self.tenant_id and self.tenant_id is not None:
            details["actor_tenant_id"] = self.tenant_id
        noted = self.noted
        return {
            "tenant_id": tenant,
            "model": noted.get("model"),
            "model_version": noted.get("model_version"),
            "policy_version": _int_or_none(noted.get("policy_version")),
            "decision": noted.get("decision"),
            "details": details,
        }


def row_from_json(data: Mapping[str, Any]) -> dict[str, Any]:
    """A spooled row back to column values (the timestamp was written as ISO 8601)."""
    row = {name: data.get(name) for name in ROW_COLUMNS}
    row["ts"] = datetime.fromisoformat(row["ts"])
    return row
