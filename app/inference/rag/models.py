"""Collections, documents and chunks. Every row carries its tenant, so every query can (and does)
name the tenant in its WHERE clause, chunks included, without a join.

The embedding column is pgvector's `vector` on PostgreSQL and a float32 blob elsewhere (SQLite);
`Embedding` below hides the difference from the write path. Vectors are stored unit-length, so a
dot product is the cosine similarity in every store.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import JSON, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from app.extensions import db
from app.identity.models import new_id, utcnow

MetadataJSON = JSON().with_variant(JSONB(), "postgresql")


class Embedding(TypeDecorator[np.ndarray]):
    """A float32 vector: pgvector's `vector` on PostgreSQL, little-endian float32 bytes elsewhere."""

    impl = LargeBinary
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from pgvector.sqlalchemy import VECTOR

            return dialect.type_descriptor(VECTOR())
        return dialect.type_descriptor(LargeBinary())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        vector = np.asarray(value, dtype=np.float32)
        return vector if dialect.name == "postgresql" else vector.astype("<f4").tobytes()

    def process_result_value(self, value: Any, dialect: Dialect) -> np.ndarray | None:
        if value is None:
            return None
        if isinstance(value, bytes | bytearray | memoryview):
            return np.frombuffer(bytes(value), dtype="<f4")
        return np.asarray(value, dtype=np.float32)


class Collection(db.Model):
    """`embedding_model` and `dimensions` are pinned: vectors of another model don't compare.

    `dimensions` is null until the first document is embedded when the model can't tell its size
    up front (an upstream model); `revision` goes up with every change to the chunks, which is how
    an in-process index (the exact store's) knows it is stale, in every worker."""

    __tablename__ = "rag_collections"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_rag_collections_tenant_name"),
        Index("ix_rag_collections_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str] = mapped_column(Text, default="")
    embedding_model: Mapped[str] = mapped_column(String(128))
    dimensions: Mapped[int | None] = mapped_column(Integer, default=None)
    revision: Mapped[int] = mapped_column(Integer, default=0)
    document_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    created_by: Mapped[str] = mapped_column(String(128), default="system")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Document(db.Model):
    """A document's text lives in its chunks (with their offsets); the hash identifies the whole."""

    __tablename__ = "rag_documents"
    __table_args__ = (
        Index("ix_rag_documents_collection_created", "tenant_id", "collection_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    collection_id: Mapped[str] = mapped_column(ForeignKey("rag_collections.id", ondelete="CASCADE"))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", MetadataJSON, default=dict)
    chars: Mapped[int] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer)
    text_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Chunk(db.Model):
    """The document's metadata is copied onto each chunk, so a filtered search reads one table."""

    __tablename__ = "rag_chunks"
    __table_args__ = (
        Index("ix_rag_chunks_collection", "tenant_id", "collection_id"),
        Index("ix_rag_chunks_document", "document_id", "ordinal"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    collection_id: Mapped[str] = mapped_column(ForeignKey("rag_collections.id", ondelete="CASCADE"))
    document_id: Mapped[str] = mapped_column(ForeignKey("rag_documents.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    start_char: Mapped[int] = mapped_column(Integer)
    end_char: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", MetadataJSON, default=dict)
    dimensions: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[np.ndarray] = mapped_column(Embedding())
