"""Retrieval-augmented generation: collections of documents per tenant, chunked and embedded with
a served embedding model, searched through a vector store (pgvector's HNSW on PostgreSQL, an
exact in-process scan on SQLite), and chat answers grounded in the retrieved chunks, with
citations. Routes are on the inference blueprint; see service.py for the request path."""

from __future__ import annotations

from flask import Flask
from sqlalchemy.engine import make_url

from app.inference.rag import models  # noqa: F401  (tables for Alembic)
from app.inference.rag.stores import store_for


def init_app(app: Flask) -> None:
    """The vector store this app's database calls for, one per app (its caches are per process)."""
    dialect = make_url(str(app.config["SQLALCHEMY_DATABASE_URI"])).get_backend_name()
    app.extensions["rag_store"] = store_for(dialect, int(app.config["RAG_EXACT_CACHE_MB"]))
