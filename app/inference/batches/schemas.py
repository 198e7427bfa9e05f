"""Request and response schemas of /v1/files and /v1/batches, in OpenAI's shapes and names.

Timestamps are Unix seconds, as OpenAI's are (the `openai` SDK parses them as integers).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import marshmallow as ma
from flask_smorest.fields import Upload

from app.inference.batches.models import Batch, BatchFile
from app.inference.schemas import Strict

CHAT_ENDPOINT = "/v1/chat/completions"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
ENDPOINTS = (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT)
UPLOAD_PURPOSES = ("batch",)
STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


# files ---------------------------------------------------------------------------------------
class FileUploadSchema(Strict):
    """The multipart body of an upload: the file, and its purpose as a plain form field."""

    file = Upload(required=True, metadata={"description": "The JSONL file (UTF-8, one request a line)."})
    purpose = ma.fields.String(
        required=True,
        validate=ma.validate.OneOf(UPLOAD_PURPOSES),
        metadata={"description": "`batch`: a JSONL file of requests for POST /v1/batches."},
    )


class FileSchema(ma.Schema):
    id = ma.fields.String(required=True)
    object = ma.fields.Constant("file", required=True)
    bytes = ma.fields.Integer(required=True)
    created_at = ma.fields.Integer(required=True)
    filename = ma.fields.String(required=True)
    purpose = ma.fields.String(required=True, metadata={"description": "`batch` or `batch_output`."})
    status = ma.fields.Constant("processed", required=True)
    expires_at = ma.fields.Integer(allow_none=True, required=True)
    status_details = ma.fields.String(allow_none=True, required=True)


class FileListArgsSchema(ma.Schema):
    purpose = ma.fields.String(validate=ma.validate.OneOf(("batch", "batch_output")))
    limit = ma.fields.Integer(load_default=100, validate=ma.validate.Range(min=1, max=10_000))
    after = ma.fields.String(
        validate=ma.validate.Length(max=48), metadata={"description": "A file id: the page after it."}
    )


class FileListSchema(ma.Schema):
    object = ma.fields.Constant("list", required=True)
    data = ma.fields.List(ma.fields.Nested(FileSchema), required=True)
    first_id = ma.fields.String(allow_none=True)
    last_id = ma.fields.String(allow_none=True)
    has_more = ma.fields.Boolean(required=True)


class FileDeletedSchema(ma.Schema):
    id = ma.fields.String(required=True)
    object = ma.fields.Constant("file", required=True)
    deleted = ma.fields.Boolean(required=True)


def file_object(row: BatchFile) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


# batches -------------------------------------------------------------------------------------
def _metadata(value: dict[str, Any]) -> None:
    if len(value) > 16:
        raise ma.ValidationError("At most 16 keys.")


class BatchCreateSchema(Strict):
    input_file_id = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=48))
    endpoint = ma.fields.String(required=True, validate=ma.validate.OneOf(ENDPOINTS))
    completion_window = ma.fields.String(required=True, validate=ma.validate.OneOf(("24h",)))
    metadata = ma.fields.Dict(
        keys=ma.fields.String(validate=ma.validate.Length(max=64)),
        values=ma.fields.String(validate=ma.validate.Length(max=512)),
        allow_none=True,
        validate=_metadata,
        metadata={"description": "Up to 16 string pairs, returned as given.", "maxProperties": 16},
    )


class BatchErrorSchema(ma.Schema):
    code = ma.fields.String(required=True)
    message = ma.fields.String(required=True)
    param = ma.fields.String(allow_none=True)
    line = ma.fields.Integer(allow_none=True)


class BatchErrorsSchema(ma.Schema):
    object = ma.fields.Constant("list", required=True)
    data = ma.fields.List(ma.fields.Nested(BatchErrorSchema), required=True)


class RequestCountsSchema(ma.Schema):
    total = ma.fields.Integer(required=True)
    completed = ma.fields.Integer(required=True)
    failed = ma.fields.Integer(required=True)


class BatchSchema(ma.Schema):
    id = ma.fields.String(required=True)
    object = ma.fields.Constant("batch", required=True)
    endpoint = ma.fields.String(required=True)
    errors = ma.fields.Nested(BatchErrorsSchema, allow_none=True, required=True)
    input_file_id = ma.fields.String(required=True)
    completion_window = ma.fields.String(required=True)
    status = ma.fields.String(required=True, validate=ma.validate.OneOf(STATUSES))
    output_file_id = ma.fields.String(allow_none=True, required=True)
    error_file_id = ma.fields.String(allow_none=True, required=True)
    request_counts = ma.fields.Nested(RequestCountsSchema, required=True)
    metadata = ma.fields.Dict(keys=ma.fields.String(), values=ma.fields.String(), allow_none=True)
    created_at = ma.fields.Integer(required=True)
    in_progress_at = ma.fields.Integer(allow_none=True)
    expires_at = ma.fields.Integer(allow_none=True)
    finalizing_at = ma.fields.Integer(allow_none=True)
    completed_at = ma.fields.Integer(allow_none=True)
    failed_at = ma.fields.Integer(allow_none=True)
    expired_at = ma.fields.Integer(allow_none=True)
    cancelling_at = ma.fields.Integer(allow_none=True)
    cancelled_at = ma.fields.Integer(allow_none=True)


class BatchListArgsSchema(ma.Schema):
    limit = ma.fields.Integer(load_default=20, validate=ma.validate.Range(min=1, max=100))
    after = ma.fields.String(
        validate=ma.validate.Length(max=48), metadata={"description": "A batch id: the page after it."}
    )


class BatchListSchema(ma.Schema):
    object = ma.fields.Constant("list", required=True)
    data = ma.fields.List(ma.fields.Nested(BatchSchema), required=True)
    first_id = ma.fields.String(allow_none=True)
    last_id = ma.fields.String(allow_none=True)
    has_more = ma.fields.Boolean(required=True)


def batch_object(batch: Batch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "request_counts": {
            "total": batch.request_total,
            "completed": batch.request_completed,
            "failed": batch.request_failed,
        },
        "metadata": batch.batch_metadata,
        **{name: unix(getattr(batch, name)) for name in TIMESTAMPS},
    }
