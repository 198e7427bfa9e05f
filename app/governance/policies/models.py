"""Versioned policies. A change is a new row with the next version; old versions stay, so an
audit record's `policy_version` always names the exact rules that decided it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.identity.models import new_id, utcnow


class Policy(db.Model):
    """`tenant_id` None is the platform default, used by tenants without a policy of their own."""

    __tablename__ = "policies"
    __table_args__ = (UniqueConstraint("scope", "version", name="uq_policies_scope_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(32), doc="tenant id, or 'default'")
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"), default=None, index=True)
    version: Mapped[int] = mapped_column()
    rules: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(128), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
