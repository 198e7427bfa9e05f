"""The append-only audit trail, hash-chained per tenant.

Each record carries the hash of the previous record of its chain, so editing or deleting a row
breaks the chain from that row on. Chains are per tenant (admin actions without a tenant go to
the `platform` chain): tenants never contend for one chain head, a tenant's export verifies on
its own, and the writer locks only the heads of the chains in a batch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db


class AuditRecord(db.Model):
    __tablename__ = "audit_records"
    __table_args__ = (
        UniqueConstraint("chain", "seq", name="uq_audit_chain_seq"),
        Index("ix_audit_tenant_ts", "tenant_id", "ts"),
        Index("ix_audit_ts", "ts"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    record_id: Mapped[str] = mapped_column(String(32), unique=True, doc="idempotency key for spool replay")
    chain: Mapped[str] = mapped_column(String(32))
    seq: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime] = mapped_column()
    kind: Mapped[str] = mapped_column(String(16), doc="inference or admin")
    request_id: Mapped[str | None] = mapped_column(String(128), default=None)
    tenant_id: Mapped[str | None] = mapped_column(String(32), default=None)
    principal: Mapped[str | None] = mapped_column(String(128), default=None)
    endpoint: Mapped[str | None] = mapped_column(String(256), default=None)
    method: Mapped[str | None] = mapped_column(String(8), default=None)
    action: Mapped[str | None] = mapped_column(String(64), default=None, doc="admin action name")
    model: Mapped[str | None] = mapped_column(String(128), default=None)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    policy_version: Mapped[int | None] = mapped_column(default=None)
    decision: Mapped[str | None] = mapped_column(String(16), default=None, doc="allow, redact or block")
    detectors: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    status: Mapped[int | None] = mapped_column(default=None)
    latency_ms: Mapped[float | None] = mapped_column(Float, default=None)
    tokens_in: Mapped[int | None] = mapped_column(default=None)
    tokens_out: Mapped[int | None] = mapped_column(default=None)
    input_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    output_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    raw_input: Mapped[str | None] = mapped_column(Text, default=None)
    raw_output: Mapped[str | None] = mapped_column(Text, default=None)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(db.Model):
    """The last (seq, hash) of each chain; writers lock this row to append in order."""

    __tablename__ = "audit_chain_heads"

    chain: Mapped[str] = mapped_column(String(32), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))
