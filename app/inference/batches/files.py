"""/v1/files, as OpenAI's Files API: batch input files uploaded here, output files read here.

Files live in the database (the `files` table), scoped to the tenant: another tenant's file id
is a 404, as an unknown one is. An upload may be at most BATCH_FILE_MAX_BYTES (8 MiB by
default); a larger one is 413 in our error shape, refused while it is being read rather than
after it has been buffered.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import marshmallow as ma
from flask import Response, current_app, request
from sqlalchemy import Select, tuple_
from sqlalchemy.orm import defer
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from app.errors import APIError
from app.extensions import db
from app.identity import scopes as sc
from app.identity.principal import current_principal, require_scopes
from app.identity.scoping import get_scoped_or_404, scoped_select
from app.inference import blp
from app.inference.batches.models import BatchFile
from app.inference.batches.schemas import (
    FileDeletedSchema,
    FileListArgsSchema,
    FileListSchema,
    FileSchema,
    FileUploadSchema,
    file_object,
)

F = TypeVar("F", bound=Callable[..., Any])
# What multipart framing (boundaries, part headers, the purpose field) adds around the file.
MULTIPART_SLACK = 64 * 1024


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"The file is larger than this gateway's limit of {limit} bytes (BATCH_FILE_MAX_BYTES).",
        param="file",
    )


def upload_limit(view: F) -> F:
    """Let this one route read a multipart body above MAX_CONTENT_LENGTH, up to the file limit;
    any other body keeps the usual limit, and is refused as the wrong media type."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if request.mimetype != "multipart/form-data":
            ceiling = current_app.config.get("MAX_CONTENT_LENGTH")
            if ceiling and (request.content_length or 0) > ceiling:
                raise APIError(
                    413, f"The request body is larger than this gateway's limit of {ceiling} bytes."
                )
            raise APIError(
                415,
                "Upload the file as multipart/form-data, with the fields `file` and `purpose`.",
                param="file",
            )
        limit = int(current_app.config["BATCH_FILE_MAX_BYTES"])
        request.max_content_length = limit + MULTIPART_SLACK
        try:
            return view(*args, **kwargs)
        except RequestEntityTooLarge:
            raise _too_large(limit) from None

    return wrapper  # type: ignore[return-value]


def newest_first(stmt: Select, model: type[Any], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's list page: newest first, `after` an id of the previous page (within the scope)."""
    if after:
        anchor = db.session.scalar(stmt.where(model.id == after))
        if anchor is None:
            raise APIError(404, f"No item with id {after!r} to list after.", param="after")
        stmt = stmt.where(tuple_(model.created_at, model.id) < tuple_(anchor.created_at, anchor.id))
    rows = list(db.session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
        "has_more": len(rows) > limit,
    }


@blp.route("/v1/files", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@upload_limit
# webargs ignores unknown multipart fields by default; OpenAI's API names them in a 400.
@blp.arguments(FileUploadSchema, location="files", error_status_code=400, unknown=ma.RAISE)
@blp.response(200, FileSchema)
@blp.alt_response(413, description="The file is larger than BATCH_FILE_MAX_BYTES.")
@blp.alt_response(415, description="The body is not multipart/form-data.")
def upload_file(form: dict[str, Any]) -> dict[str, Any]:
    """Upload a file (multipart: `file`, `purpose=batch`)."""
    upload: FileStorage = form["file"]
    limit = int(current_app.config["BATCH_FILE_MAX_BYTES"])
    content = upload.stream.read(limit + 1)
    if len(content) > limit:
        raise _too_large(limit)
    row = BatchFile(
        tenant_id=current_principal().tenant_id,
        purpose=form["purpose"],
        filename=(upload.filename or "upload.jsonl")[:255],
        bytes=len(content),
        content=content,
    )
    db.session.add(row)
    db.session.commit()
    return file_object(row)


@blp.route("/v1/files", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(FileListArgsSchema, location="query", error_status_code=400)
@blp.response(200, FileListSchema)
def list_files(args: dict[str, Any]) -> dict[str, Any]:
    """List the tenant's files, newest first."""
    stmt = scoped_select(BatchFile).options(defer(BatchFile.content))
    if args.get("purpose"):
        stmt = stmt.where(BatchFile.purpose == args["purpose"])
    page = newest_first(stmt, BatchFile, args["limit"], args.get("after"))
    return {**page, "data": [file_object(row) for row in page["data"]]}


@blp.route("/v1/files/<file_id>", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, FileSchema)
def get_file(file_id: str) -> dict[str, Any]:
    """A file's metadata."""
    return file_object(get_scoped_or_404(BatchFile, file_id))


@blp.route("/v1/files/<file_id>/content", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, content_type="application/jsonl", description="The file's bytes, as uploaded or written.")
def get_file_content(file_id: str) -> Response:
    """A file's content (JSONL)."""
    row = get_scoped_or_404(BatchFile, file_id)
    name = row.filename.replace('"', "")
    return Response(
        row.content,
        mimetype="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@blp.route("/v1/files/<file_id>", methods=["DELETE"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, FileDeletedSchema)
def delete_file(file_id: str) -> dict[str, Any]:
    """Delete a file. A batch made from it keeps its own copy of the requests and runs on."""
    row = get_scoped_or_404(BatchFile, file_id)
    db.session.delete(row)
    db.session.commit()
    return {"id": file_id, "object": "file", "deleted": True}
