"""Files, batches and the lines of each batch, in the database: the queue carries only line ids.

A batch's lines are copied out of its input file when it is created, one `BatchLine` row each,
keyed by (batch_id, line). That row is where a line's result lands, exactly once: the worker
writes it with `UPDATE ... WHERE finished_at IS NULL` in the same transaction as the batch's
counters and the tenant's token ledger, so a line the queue delivers twice (a worker killed after
the commit, before the ack) is recorded, counted and billed once.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.timestamps import utcnow

# What a batch is once nothing more will happen to it.
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})


def file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


class BatchFile(db.Model):
    """An uploaded JSONL file (purpose `batch`) or one the worker wrote (`batch_output`)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True, default=file_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(Integer)
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Batch(db.Model):
    """One batch job. The owner's identity is kept so every line runs as the principal who
    created it (scopes included), and a revoked owner stops its batch at the next line."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True, default=batch_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(48))
    completion_window: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    output_file_id: Mapped[str | None] = mapped_column(String(48), default=None)
    error_file_id: Mapped[str | None] = mapped_column(String(48), default=None)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # `metadata` is the declarative base's own attribute; the column keeps OpenAI's name.
    batch_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, default=None)
    request_total: Mapped[int] = mapped_column(Integer, default=0)
    request_completed: Mapped[int] = mapped_column(Integer, default=0)
    request_failed: Mapped[int] = mapped_column(Integer, default=0)
    owner_subject: Mapped[str] = mapped_column(String(128))
    owner_kind: Mapped[str] = mapped_column(String(16))
    owner_key_id: Mapped[str | None] = mapped_column(String(32), default=None)
    owner_user_id: Mapped[str | None] = mapped_column(String(32), default=None)
    owner_scopes: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    in_progress_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime] = mapped_column()
    finalizing_at: Mapped[datetime | None] = mapped_column(default=None)
    completed_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)
    expired_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelling_at: Mapped[datetime | None] = mapped_column(default=None)
    cancelled_at: Mapped[datetime | None] = mapped_column(default=None)


class BatchLine(db.Model):
    """One request of a batch and, once run, its result.

    `attempts` counts deliveries that started the line; a second one means the worker running
    the first died, and a third is refused (the line fails with `worker_lost`), so a line that
    kills its worker is retried once, not forever. `started_at` set and `finished_at` unset is a
    line in flight, which a cancel waits for.
    """

    __tablename__ = "batch_lines"
    __table_args__ = (UniqueConstraint("batch_id", "custom_id", name="uq_batch_lines_custom_id"),)

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    response_id: Mapped[str | None] = mapped_column(String(48), default=None)
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
