"""The model registry: models, their versions, aliases, traffic policy, and a revision counter.

The registry is the runtime source of truth for what the gateway serves; `config/models.yaml`
only seeds it. `RegistryState.revision` goes up with every change, and every worker compares it
cheaply with the revision it serves, so a change reaches all workers without a restart.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, BigInteger, Float, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.identity.models import new_id, utcnow

VERSION_STATUSES = ("staged", "active", "retired")


class RegisteredModel(db.Model):
    """A served name. Traffic: the active version, plus an optional canary taking `canary_weight`%.

    `required`: the instance is ready only once this model is loaded. A model that fails to load
    is reported by /readyz either way, but only a required one takes the instance out of service.

    Version ids are plain strings rather than foreign keys: the two tables point at each other,
    and the service layer checks that a version belongs to its model.
    """

    __tablename__ = "registry_models"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    disabled: Mapped[bool] = mapped_column(default=False)
    required: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    active_version_id: Mapped[str | None] = mapped_column(String(32), default=None)
    previous_version_id: Mapped[str | None] = mapped_column(String(32), default=None)
    canary_version_id: Mapped[str | None] = mapped_column(String(32), default=None)
    canary_weight: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.created_at"
    )
    aliases: Mapped[list[ModelAlias]] = relationship(back_populates="model", cascade="all, delete-orphan")


class ModelVersion(db.Model):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    model_id: Mapped[str] = mapped_column(ForeignKey("registry_models.id"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifact_uri: Mapped[str | None] = mapped_column(Text, default=None)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    status: Mapped[str] = mapped_column(String(16), default="staged")
    reference_profile: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    created_by: Mapped[str] = mapped_column(String(128), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[RegisteredModel] = relationship(back_populates="versions")


class ModelAlias(db.Model):
    __tablename__ = "model_aliases"

    alias: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("registry_models.id"), index=True)

    model: Mapped[RegisteredModel] = relationship(back_populates="aliases")


class RegistryState(db.Model):
    """One row; `revision` increases with every registry change."""

    __tablename__ = "registry_state"

    id: Mapped[int] = mapped_column(primary_key=True, default=1)
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
