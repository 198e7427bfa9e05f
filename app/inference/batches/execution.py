"""One batch line, run by a worker through the gateway's own governed path, recorded exactly once.

    claim      (batch row locked: not cancelled, not expired, not already run, retried at most once)
    -> run     (the route's schema, then service.run_chat / run_embeddings as the batch's owner,
                in a request context of the line's endpoint: policy, quota, routing, the backend,
                drift and one audit record per line, exactly as an HTTP call gets them)
    -> record  (the line's result, the batch's counters and the tenant's token ledger, in one
                transaction that only the first attempt to finish can commit)
    -> settle  (the batch row locked again: the last line, or the last line in flight of a
                cancelled batch, writes the output and error files and ends the batch)

Per-request rate limits don't apply to lines: a batch is admitted by the tenant's token quota,
which every line reserves and settles like any call, and the limits govern the API calls
(uploading, creating); OpenAI's batch limits are separate from its request limits too.

What "exactly once" leaves out: the Redis quota counter is adjusted when a line's call settles,
a few milliseconds before its result commits. A worker killed in between leaves that line's
tokens counted in Redis while its rerun counts them again, erring towards refusing (never
overspending) until the counter is next rebuilt from the ledger (`quota.reconcile`). The ledger,
the counters and the output are exact.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import marshmallow as ma
import structlog
from flask import current_app, g, jsonify
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import OperationalError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from app.errors import APIError, validation_error
from app.extensions import db
from app.governance.audit import hooks as audit_hooks
from app.identity import ledger
from app.identity.accounts import PLATFORM_TENANT, credential_active, tenant_settings
from app.identity.principal import Principal
from app.inference import service
from app.inference.batches.models import Batch, BatchFile, BatchLine
from app.inference.batches.schemas import CHAT_ENDPOINT
from app.inference.schemas import ChatCompletionRequestSchema, EmbeddingRequestSchema, reject
from app.timestamps import utcnow

log = structlog.get_logger(__name__)

SCHEMAS: dict[str, ma.Schema] = {
    CHAT_ENDPOINT: ChatCompletionRequestSchema(),
    "/v1/embeddings": EmbeddingRequestSchema(),
}
MAX_ATTEMPTS = 2  # the first run, and one retry after the worker running it died


@dataclass
class Outcome:
    status_code: int | None
    body: dict[str, Any] | None
    request_id: str | None
    tokens: int
    usage: Counter[tuple[str, str]]
    error: dict[str, str] | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


# claim -------------------------------------------------------------------------------------
def _locked_batch(batch_id: str) -> Batch | None:
    """The batch row, locked until commit: claims, cancels and finalisation take turns on it."""
    locked = select(Batch).where(Batch.id == batch_id).with_for_update()
    return db.session.scalar(locked.execution_options(populate_existing=True))


def _claim(batch_id: str, number: int) -> tuple[Batch, BatchLine] | Outcome | None:
    """Start the line, or say why not: None (nothing to do), or an Outcome to record unrun."""
    batch = _locked_batch(batch_id)
    row = db.session.get(BatchLine, (batch_id, number)) if batch is not None else None
    if batch is None or row is None or row.finished_at is not None:
        db.session.rollback()
        return None  # gone, or already recorded by an earlier delivery
    if batch.status != "in_progress":
        # Cancelled (or ended) before this line ran: it is not run. A claim left by a worker that
        # died is withdrawn, so the cancel is not waiting for a line that will never finish.
        row.started_at = None
        db.session.commit()
        return None
    if utcnow() >= batch.expires_at:
        db.session.rollback()
        return Outcome(
            None, None, None, 0, Counter(), _error("batch_expired", "The batch's completion window ended.")
        )
    if row.attempts >= MAX_ATTEMPTS:
        db.session.rollback()
        return Outcome(
            None,
            None,
            None,
            0,
            Counter(),
            _error(
                "worker_lost",
                f"The workers running this line died {row.attempts} times; it is not run again.",
            ),
        )
    row.attempts += 1
    row.started_at = utcnow()
    if db.session.get_bind().dialect.name == "postgresql":
        # The claim needn't wait for its WAL flush: a crash that loses it loses an attempt count
        # and an in-flight mark, never a result (the record's commit stays synchronous). One
        # fsync fewer per line.
        db.session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    db.session.commit()
    return batch, row


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


# run ---------------------------------------------------------------------------------------
def owner(batch: Batch) -> Principal:
    """The batch's creator as a Principal, re-checked per line: a revoked key or a disabled
    tenant stops the batch's remaining lines (401/403 each), as it stops their HTTP calls."""
    settings = tenant_settings(batch.tenant_id)
    if settings is None or not settings.active:
        raise APIError(403, "This tenant is disabled.", code="tenant_disabled")
    credential = batch.owner_key_id if batch.owner_kind == "api_key" else batch.owner_user_id
    if credential is None or not credential_active(batch.owner_kind, credential):
        raise APIError(
            401, "The credential that created this batch has been revoked or disabled.", code="token_revoked"
        )
    return Principal(
        tenant_id=batch.tenant_id,
        subject=batch.owner_subject,
        kind=batch.owner_kind,
        scopes=frozenset(batch.owner_scopes.split()),
        key_id=batch.owner_key_id,
        user_id=batch.owner_user_id,
        platform=settings.name == PLATFORM_TENANT,
    )


def _call(batch: Batch, body: dict[str, Any]) -> dict[str, Any]:
    g.tenant = batch.tenant_id  # the audit record's tenant, even when the owner check refuses
    principal = owner(batch)
    g.principal = principal
    try:
        loaded = SCHEMAS[batch.endpoint].load(body)
    except ma.ValidationError as exc:
        raise validation_error(400, exc.messages) from None
    if batch.endpoint != CHAT_ENDPOINT:
        return service.run_embeddings(principal, loaded)
    if loaded.get("stream"):
        raise reject("stream", "A batch line can't be streamed; its answer goes to the output file.")
    return service.run_chat(principal, loaded)


def run(batch: Batch, row: BatchLine) -> Outcome:
    """The line as the HTTP route would serve it: same schema, same service, one audit record."""
    request_id = uuid.uuid4().hex
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    audited = bool(app.config["AUDIT_ENABLED"])
    with (
        app.test_request_context(
            batch.endpoint, method="POST", json=row.body, headers={"X-Request-ID": request_id}
        ),
        ledger.capture() as usage,
    ):
        try:
            if audited:
                audit_hooks.open_record()
                audit_hooks.note(details={"batch_id": batch.id, "custom_id": row.custom_id})
            status, body = 200, _call(batch, row.body)
        except APIError as exc:
            status, body = exc.status, exc.payload()
        except Exception:  # a bug in a line must not stop the batch; the traceback goes to the log
            log.exception("batch_line_error", batch_id=batch.id, line=row.line)
            error = APIError(500, "The server had an internal error; quote the request_id to the operator.")
            status, body = 500, error.payload()
        response = jsonify(body)
        response.status_code = status
        if audited:
            audit_hooks.close_record(response)
        response.close()  # submits the audit record, as the end of an HTTP response does
    tokens = int((body.get("usage") or {}).get("total_tokens") or 0) if status == 200 else 0
    return Outcome(status, body, request_id, tokens, usage)


# record and settle ---------------------------------------------------------------------------
@retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=0.2, max=5),
    stop=stop_after_delay(60),
    reraise=True,
)
def record(batch_id: str, number: int, outcome: Outcome) -> bool:
    """Write the line's result, count it and bill it, once; False if another delivery won.

    Retried while the database is unreachable: the line has run, and running it again would
    spend its tokens twice."""
    try:
        won = db.session.execute(
            update(BatchLine)
            .where(BatchLine.batch_id == batch_id, BatchLine.line == number, BatchLine.finished_at.is_(None))
            .values(
                finished_at=utcnow(),
                response_id=f"batch_req_{uuid.uuid4().hex}",
                request_id=outcome.request_id,
                status_code=outcome.status_code,
                response=outcome.body,
                error=outcome.error,
                tokens=outcome.tokens,
            )
        ).rowcount
        if won != 1:
            db.session.rollback()
            return False
        ok = outcome.succeeded
        db.session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(
                request_completed=Batch.request_completed + int(ok),
                request_failed=Batch.request_failed + int(not ok),
            )
        )
        ledger.write(db.session.connection(), outcome.usage)
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    return True


def settle(batch_id: str) -> str | None:
    """End the batch if nothing is left to run (or, cancelling, nothing is in flight); returns
    the status it ended with, or None. Every line's worker and the cancel route call it: the lock
    makes exactly one of them finalise."""
    batch = _locked_batch(batch_id)
    if batch is None or batch.status not in ("in_progress", "cancelling"):
        db.session.rollback()
        return None
    if batch.status == "in_progress":
        # The counters move in the same transaction as each line's result: exact, and O(1) per
        # line where counting unfinished rows would make a batch's settling quadratic in its size.
        pending = batch.request_total - batch.request_completed - batch.request_failed
    else:
        pending = db.session.scalar(
            select(func.count())
            .select_from(BatchLine)
            .where(
                BatchLine.batch_id == batch_id,
                BatchLine.started_at.isnot(None),
                BatchLine.finished_at.is_(None),
            )
        )
    if pending:
        db.session.rollback()
        return None
    _finalize(batch)
    db.session.commit()
    log.info("batch_finished", batch_id=batch_id, status=batch.status)
    return batch.status


def _finalize(batch: Batch) -> None:
    """Write the output file (2xx answers) and the error file (the rest), in line order."""
    now = utcnow()
    batch.finalizing_at = now
    output: list[str] = []
    errors: list[str] = []
    expired = False
    rows = db.session.scalars(
        select(BatchLine)
        .where(BatchLine.batch_id == batch.id, BatchLine.finished_at.isnot(None))
        .order_by(BatchLine.line)
    )
    for row in rows:
        response = (
            None
            if row.status_code is None
            else {"status_code": row.status_code, "request_id": row.request_id, "body": row.response}
        )
        item = {"id": row.response_id, "custom_id": row.custom_id, "response": response, "error": row.error}
        ok = row.status_code is not None and 200 <= row.status_code < 300
        (output if ok else errors).append(json.dumps(item, separators=(",", ":")))
        expired = expired or (row.error or {}).get("code") == "batch_expired"
    batch.output_file_id = _write(batch, "output", output)
    batch.error_file_id = _write(batch, "error", errors)
    if batch.status == "cancelling":
        batch.status, batch.cancelled_at = "cancelled", now
    elif expired:
        batch.status, batch.expired_at = "expired", now
    else:
        batch.status, batch.completed_at = "completed", now


def _write(batch: Batch, kind: str, lines: list[str]) -> str | None:
    if not lines:
        return None
    content = ("\n".join(lines) + "\n").encode()
    row = BatchFile(
        tenant_id=batch.tenant_id,
        purpose="batch_output",
        filename=f"{batch.id}_{kind}.jsonl",
        bytes=len(content),
        content=content,
    )
    db.session.add(row)
    db.session.flush()
    return row.id


def run_line(batch_id: str, number: int) -> None:
    """What one queue message does, inside an app context of its own (`g` holds one line's
    request id, principal and audit record, so a context must not outlive its message)."""
    claimed = _claim(batch_id, number)
    if isinstance(claimed, Outcome):
        record(batch_id, number, claimed)
    elif claimed is not None:
        batch, row = claimed
        record(batch_id, number, run(batch, row))
    settle(batch_id)
