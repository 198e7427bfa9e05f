"""Routes: collections of documents per tenant, ingestion and search (on the inference blueprint).

Every route needs `inference:invoke`: collections are the caller's own inference data, and
ingestion and search call an embedding model. Only the listing takes `tenant_id`, for the
platform admin (the one tenant-scoping rule: anyone else naming another tenant is 403).
"""

from __future__ import annotations

from typing import Any

from flask import current_app

from app.admission import unbounded
from app.identity import scopes as sc
from app.identity.principal import current_principal, require_scopes
from app.inference import blp
from app.inference.rag import service
from app.inference.rag.models import Collection
from app.inference.rag.schemas import (
    CollectionCreateSchema,
    CollectionListArgsSchema,
    CollectionPageSchema,
    CollectionSchema,
    DeletedSchema,
    IngestRequestSchema,
    IngestResponseSchema,
    SearchRequestSchema,
    SearchResponseSchema,
)

NOT_FOUND = {404: "NOT_FOUND"}


@blp.route("/v1/collections", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(CollectionCreateSchema)
@blp.response(201, CollectionSchema)
@blp.doc(responses={400: "BAD_REQUEST", 404: "NOT_FOUND", 409: "CONFLICT"})
def create_collection(body: dict[str, Any]) -> Collection:
    """Create a collection

    Its embedding model (and that model's dimension) is fixed for the collection's life: vectors
    from two models don't compare. A name is unique per tenant (409 `collection_exists`).
    """
    return service.create_collection(current_principal(), body, current_app.config["RAG_EMBEDDING_MODEL"])


@blp.route("/v1/collections", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(CollectionListArgsSchema, location="query")
@blp.response(200, CollectionPageSchema)
def list_collections(args: dict[str, Any]) -> dict[str, Any]:
    """List the tenant's collections, oldest first"""
    return service.list_collections(current_principal(), args)


@blp.route("/v1/collections/<collection_id>", methods=["GET"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, CollectionSchema)
@blp.doc(responses=NOT_FOUND)
def get_collection(collection_id: str) -> Collection:
    """Get a collection"""
    return service.readable_collection(current_principal(), collection_id)


@blp.route("/v1/collections/<collection_id>", methods=["DELETE"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.response(200, DeletedSchema)
@blp.doc(responses=NOT_FOUND)
def delete_collection(collection_id: str) -> dict[str, Any]:
    """Delete a collection, its documents and their chunks"""
    return service.delete_collection(current_principal(), collection_id)


@blp.route("/v1/collections/<collection_id>/documents", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(IngestRequestSchema)
@blp.response(201, IngestResponseSchema)
@blp.doc(responses={400: "BAD_REQUEST", 404: "NOT_FOUND", 409: "CONFLICT", 413: "REQUEST_ENTITY_TOO_LARGE"})
@unbounded
def add_documents(body: dict[str, Any], collection_id: str) -> dict[str, Any]:
    """Add documents to a collection

    Each document is split into chunks of 400-800 characters (overlapping by up to 100), which
    are embedded with the collection's model in one governed call (policy, quota, audit) and
    stored in one transaction. At most 32 documents per call, 50,000 characters each.
    """
    return service.ingest(current_principal(), collection_id, body)


@blp.route("/v1/collections/<collection_id>/search", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(SearchRequestSchema)
@blp.response(200, SearchResponseSchema)
@blp.doc(responses={400: "BAD_REQUEST", 404: "NOT_FOUND", 409: "CONFLICT"})
@unbounded
def search(body: dict[str, Any], collection_id: str) -> dict[str, Any]:
    """Search a collection

    The `top_k` chunks nearest to the query (cosine similarity, best first) among those whose
    metadata satisfies `filter`; a malformed filter is 400 `invalid_filter`.
    """
    return service.search(current_principal(), collection_id, body)
