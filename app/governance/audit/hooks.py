"""Which requests are audited, and what the request path adds to their records.

Every request to the inference blueprint (but its two unauthenticated health probes) and every
POST/PUT/PATCH/DELETE to the governance blueprint (token endpoints included) or the console gets exactly one
record. It is submitted by `response.call_on_close`, i.e. once the response is fully sent; for an
SSE stream that is after its last byte and after the stream's `on_finish`, so tokens, output and
status noted there are final.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flask import Flask, Response, current_app, g, has_request_context, request
from werkzeug.exceptions import RequestEntityTooLarge

from app import tracing
from app.governance.audit.records import SAFE_FORM_FIELDS, Pending
from app.governance.audit.writer import AuditWriter
from app.identity.models import utcnow
from app.observability import request_id

NOTE_FIELDS = frozenset(
    {
        "model",
        "model_version",
        "policy_version",
        "decision",
        "detectors",
        "tokens_in",
        "tokens_out",
        "input",
        "output",
        "raw_opt_in",
        "status",
        "details",
    }
)
UNAUDITED_ENDPOINTS = frozenset({"inference.v2_live", "inference.v2_ready"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The console's forms change what the governance API changes, so they are audited alike.
ADMIN_BLUEPRINTS = frozenset({"governance", "console"})


@dataclass
class AuditContext:
    kind: str
    ts: datetime
    started: float
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    noted: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def note(**fields: Any) -> None:
    """Add to the current request's audit record: model, model_version, policy_version, decision,
    detectors, tokens_in, tokens_out, input, output (objects, hashed as canonical JSON),
    raw_opt_in, status (overrides the HTTP status) or details (a dict, merged).

    Later calls override earlier ones. Outside an audited request it does nothing, so service code
    can call it unconditionally; an unknown name is a bug and raises TypeError.
    """
    unknown = set(fields) - NOTE_FIELDS
    if unknown:
        raise TypeError(f"note() got unknown field(s) {', '.join(sorted(unknown))}")
    if not has_request_context():
        return
    context: AuditContext | None = g.get("audit_context")
    if context is None:
        return
    details = fields.pop("details", None)
    if details:
        context.details.update(details)
    context.noted.update(fields)


def writer() -> AuditWriter:
    return current_app.extensions["audit"]


def admit() -> None:
    """503 `audit_unavailable` when the buffer is full (fail closed); no-op when auditing is off."""
    audit = current_app.extensions.get("audit")
    if audit is not None and current_app.config["AUDIT_ENABLED"]:
        audit.admit()


def _kind() -> str | None:
    if request.blueprint == "inference" and request.endpoint not in UNAUDITED_ENDPOINTS:
        return "inference"
    if request.blueprint in ADMIN_BLUEPRINTS and request.method in WRITE_METHODS:
        return "admin"
    return None


def open_record() -> None:
    audit = writer()
    audit.start()  # on a worker's first request: replays what dead workers left in the spool
    kind = _kind()
    if kind is None:
        return
    audit.admit()
    context = g.audit_context = AuditContext(kind=kind, ts=utcnow(), started=time.perf_counter())
    if audit.journal is not None:
        audit.journal.opened(context.record_id, kind, context.ts, request_id(), request.path, request.method)


def _request_body() -> bytes:
    """The body to hash, or nothing when it was refused as too large: reading it again would
    raise RequestEntityTooLarge inside this hook and turn the client's JSON 413 into a 500."""
    try:
        return request.get_data(cache=True)
    except RequestEntityTooLarge:
        return b""


def _safe_form() -> dict[str, str]:
    if request.mimetype != "application/x-www-form-urlencoded":
        return {}
    try:
        return {k: request.form[k] for k in SAFE_FORM_FIELDS if k in request.form}
    except RequestEntityTooLarge:
        return {}


@tracing.step("audit")
def close_record(response: Response) -> Response:
    context: AuditContext | None = g.get("audit_context")
    if context is None:
        return response
    principal = g.get("principal")
    endpoint = request.endpoint or ""
    pending = Pending(
        kind=context.kind,
        ts=context.ts,
        request_id=request_id(),
        tenant_id=g.get("tenant"),
        principal=principal.subject if principal is not None else None,
        endpoint=request.path,
        method=request.method,
        action=endpoint.removeprefix("governance.") if context.kind == "admin" else None,
        status=response.status_code,
        latency_ms=0.0,
        noted=context.noted,
        details=context.details,
        view_args=dict(request.view_args or {}),
        served_model=g.get("served_model"),
        request_body=_request_body() if context.kind == "inference" else b"",
        response_body=b"" if response.is_streamed or not response.is_json else response.get_data(),
        form=_safe_form() if context.kind == "admin" else {},
        record_id=context.record_id,
    )
    audit = writer()
    if response.is_streamed and audit.journal is not None:
        audit.journal.started(
            pending.record_id,
            pending.tenant_id,
            pending.principal,
            context.noted.get("model") or pending.served_model,
        )

    def submit() -> None:
        pending.latency_ms = (time.perf_counter() - context.started) * 1000
        audit.submit(pending)

    response.call_on_close(submit)
    return response


def init_app(app: Flask) -> None:
    if app.config["AUDIT_ENABLED"]:
        app.before_request(open_record)
        app.after_request(close_record)
