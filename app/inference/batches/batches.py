"""/v1/batches, as OpenAI's Batch API: create from an uploaded file, read, list, cancel.

Creating a batch checks its input file whole (400 naming the bad line), copies the requests into
`batch_lines` and puts one message per line on the queue; the batch is then `in_progress` and
workers run its lines (execution.py). The routes answer 503 when this gateway has no Redis
(`batch_queue_unavailable`) and creating one answers 503 `batch_worker_unavailable` when no worker
is running, rather than accepting a batch nothing will run.

Cancelling stops the batch at once for every line not yet started (a worker that picks one up
skips it); lines already running finish and are recorded, and the batch is `cancelled`, with
the files of what ran, as soon as the last of them has.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import current_app
from kombu.exceptions import OperationalError as QueueError
from redis.exceptions import RedisError

from app.errors import APIError
from app.extensions import db
from app.identity import scopes as sc
from app.identity.principal import current_principal, require_scopes
from app.identity.scoping import get_scoped_or_404, scoped_select
from app.inference import blp
from app.inference.batches import execution, lines, queue
from app.inference.batches.files import newest_first
from app.inference.batches.models import TERMINAL, Batch, BatchFile, BatchLine
from app.inference.batches.schemas import (
    BatchCreateSchema,
    BatchListArgsSchema,
    BatchListSchema,
    BatchSchema,
    batch_object,
)
from app.timestamps import utcnow

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
UNAVAILABLE = "No Redis (batch_queue_unavailable) or no worker running (batch_worker_unavailable)."


def _input_file(file_id: str) -> BatchFile:
    row = db.session.scalar(scoped_select(BatchFile).where(BatchFile.id == file_id))
    if row is None:
        raise APIError(404, f"No file with id {file_id!r}.", param="input_file_id")
    if row.purpose != "batch":
        raise APIError(
            400,
            f"File {file_id!r} has purpose {row.purpose!r}; a batch's input file must have purpose 'batch'.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    return row


@blp.route("/v1/batches", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(BatchCreateSchema, error_status_code=400)
@blp.response(200, BatchSchema)
@blp.alt_response(503, description=UNAVAILABLE)
def create_batch(data: dict[str, Any]) -> dict[str, Any]:
    """Create a batch from an uploaded JSONL file of requests."""
    queue.require_queue()
    principal = current_principal()
    source = _input_file(data["input_file_id"])
    requests = lines.parse(source.content, data["endpoint"], int(current_app.config["BATCH_MAX_LINES"]))
    queue.require_worker()
    now = utcnow()
    batch = Batch(
        tenant_id=principal.tenant_id,
        endpoint=data["endpoint"],
        input_file_id=source.id,
        completion_window=data["completion_window"],
        status="in_progress",
        batch_metadata=data.get("metadata"),
        request_total=len(requests),
        request_completed=0,
        request_failed=0,
        owner_subject=principal.subject,
        owner_kind=principal.kind,
        owner_key_id=principal.key_id,
        owner_user_id=principal.user_id,
        owner_scopes=" ".join(sorted(principal.scopes)),
        created_at=now,
        in_progress_at=now,
        expires_at=now + COMPLETION_WINDOWS[data["completion_window"]],
    )
    db.session.add(batch)
    db.session.flush()
    db.session.add_all(
        BatchLine(batch_id=batch.id, line=r.line, custom_id=r.custom_id, body=r.body, attempts=0, tokens=0)
        for r in requests
    )
    db.session.commit()
    try:
        queue.enqueue(batch.id, [r.line for r in requests])
    except (QueueError, RedisError, OSError) as exc:
        # Lines already queued find the batch failed and do nothing.
        batch.status, batch.failed_at = "failed", utcnow()
        batch.errors = {
            "object": "list",
            "data": [
                {"code": "queue_unavailable", "message": "The batch queue failed while queueing lines."}
            ],
        }
        db.session.commit()
        raise APIError(
            503, "The batch queue (Redis) failed; retry shortly.", code="batch_queue_unavailable"
        ) from exc
    return batch_object(batch)


@blp.route("/v1/batches", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(BatchListArgsSchema, location="query", error_status_code=400)
@blp.response(200, BatchListSchema)
@blp.alt_response(503, description=UNAVAILABLE)
def list_batches(args: dict[str, Any]) -> dict[str, Any]:
    """List the tenant's batches, newest first."""
    queue.require_queue()
    page = newest_first(scoped_select(Batch), Batch, args["limit"], args.get("after"))
    return {**page, "data": [batch_object(row) for row in page["data"]]}


@blp.route("/v1/batches/<batch_id>", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, BatchSchema)
@blp.alt_response(503, description=UNAVAILABLE)
def get_batch(batch_id: str) -> dict[str, Any]:
    """A batch: its status, request counts and, once it has ended, its output and error files."""
    queue.require_queue()
    return batch_object(get_scoped_or_404(Batch, batch_id))


@blp.route("/v1/batches/<batch_id>/cancel", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, BatchSchema)
@blp.alt_response(409, description="The batch has already completed, failed or expired.")
@blp.alt_response(503, description=UNAVAILABLE)
def cancel_batch(batch_id: str) -> dict[str, Any]:
    """Cancel a batch: lines not yet started are not run; it ends `cancelled` once running ones finish."""
    locked = scoped_select(Batch).where(Batch.id == batch_id).with_for_update()
    batch = db.session.scalar(locked.execution_options(populate_existing=True))
    if batch is None:
        raise APIError(404, f"No batch with id {batch_id!r}.")
    queue.require_queue()
    if batch.status in TERMINAL - {"cancelled"}:
        db.session.rollback()
        raise APIError(409, f"The batch has already {batch.status.replace('_', ' ')}; it can't be cancelled.")
    if batch.status == "in_progress":
        batch.status, batch.cancelling_at = "cancelling", utcnow()
    db.session.commit()
    execution.settle(batch_id)
    return batch_object(get_scoped_or_404(Batch, batch_id))
