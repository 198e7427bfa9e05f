"""Tenants, users, API keys and persisted token usage. Secrets are stored only as hashes:
argon2id for passwords, HMAC-SHA256 under the server's pepper for API keys (identity/hashing.py)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.timestamps import utcnow


def new_id() -> str:
    return uuid.uuid4().hex


class ScopedMixin:
    """Scopes are stored space-separated, as OAuth2 writes them on the wire."""

    scopes: Mapped[str] = mapped_column(Text, default="")

    @property
    def scope_set(self) -> frozenset[str]:
        return frozenset(self.scopes.split())


class Tenant(db.Model):
    """`rate_limit` caps the whole tenant, `key_rate_limit` each credential in it (flask-limiter syntax)."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    rate_limit: Mapped[str | None] = mapped_column(String(64), default=None)
    key_rate_limit: Mapped[str | None] = mapped_column(String(64), default=None)
    token_quota: Mapped[int | None] = mapped_column(BigInteger, default=None)
    quota_period: Mapped[str] = mapped_column(String(8), default="day")
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    users: Mapped[list[User]] = relationship(back_populates="tenant")


class User(ScopedMixin, db.Model):
    """Usernames are unique across tenants because the password grant names no tenant."""

    __tablename__ = "users"
    __table_args__ = (Index("ix_users_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tenant: Mapped[Tenant] = relationship(back_populates="users")


class ApiKey(ScopedMixin, db.Model):
    """`prefix` is the visible, unique half of the key (the lookup index); the secret half is only hashed."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    user_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), default=None)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(24), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TokenUsage(db.Model):
    """Settled tokens per tenant and quota period: the ledger Redis counters are rebuilt from."""

    __tablename__ = "token_usage"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    period: Mapped[str] = mapped_column(String(16), primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
