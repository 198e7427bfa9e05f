"""Vector stores: which one searches is decided by the database the gateway runs on."""

from __future__ import annotations

from flask import current_app

from app.inference.rag.stores.base import Hit, VectorStore

__all__ = ["Hit", "VectorStore", "store_for", "vector_store"]


def store_for(dialect: str, cache_mb: int) -> VectorStore:
    """pgvector's HNSW index on PostgreSQL; an exact in-process scan on SQLite."""
    if dialect == "postgresql":
        from app.inference.rag.stores.pgvector import PgVectorStore

        return PgVectorStore()
    from app.inference.rag.stores.exact import ExactStore

    return ExactStore(cache_bytes=cache_mb * 1024 * 1024)


def vector_store() -> VectorStore:
    return current_app.extensions["rag_store"]
