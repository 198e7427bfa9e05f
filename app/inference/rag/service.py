"""RAG on the governed request path: ingestion, search and chat compose the service functions
every inference route uses, so policy (PII included), quota, audit, rate limits and metrics
apply to the embedding and generation steps exactly as they do on /v1/embeddings and
/v1/chat/completions.

    ingest:  collection (tenant-scoped) -> chunk -> embed_texts -> one transaction of rows
    search:  filter -> collection -> embed_texts(query) -> store.search
    chat:    filter -> collection -> embed_texts(question) -> store.search
             -> run_chat / chat_completion with the chunks as numbered sources -> citations

Every collection lookup names the caller's tenant in its WHERE: another tenant's collection id
is 404 `collection_not_found`, exactly as an id that never existed, so existence never leaks.
Writes, searches and chats act in the caller's own tenant only (they spend its quota under its
policy); the platform admin may list and read any tenant's collections, by the one scoping rule.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Response, g
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import APIError
from app.extensions import db
from app.governance import audit
from app.governance.pagination import paginate
from app.identity.principal import Principal
from app.identity.scoping import scoped_select
from app.inference import metrics, service
from app.inference.catalogue import catalogue
from app.inference.rag import chunking, filters
from app.inference.rag.models import Chunk, Collection, Document
from app.inference.rag.schemas import MAX_DOCUMENT_CHARS
from app.inference.rag.stores import Hit, vector_store
from app.inference.runtime import ModelRuntime
from app.inference.streaming import sse

CITATION = re.compile(r"\[(\d{1,3})\]")
SYSTEM_PROMPT = (
    "Answer the user's question using only the numbered sources below, and cite each source you "
    "use by its number in square brackets, like [1]. If the sources do not contain the answer, "
    "say that you don't know."
)


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


def _not_found(collection_id: str) -> APIError:
    return APIError(
        404, f"No collection with id {collection_id!r}.", code="collection_not_found", param="collection_id"
    )


# collections ----------------------------------------------------------------------------------
def own_collection(principal: Principal, collection_id: str) -> Collection:
    """The caller's collection: the tenant is in the query, so another tenant's id is not found."""
    found = db.session.scalar(
        select(Collection).where(Collection.tenant_id == principal.tenant_id, Collection.id == collection_id)
    )
    if found is None:
        raise _not_found(collection_id)
    return found


def readable_collection(principal: Principal, collection_id: str) -> Collection:
    """A collection the caller may read: its own tenant's, or any for the platform admin."""
    found = db.session.scalar(scoped_select(Collection, principal).where(Collection.id == collection_id))
    if found is None:
        raise _not_found(collection_id)
    return found


def list_collections(principal: Principal, args: dict[str, Any]) -> dict[str, Any]:
    stmt = scoped_select(Collection, principal, tenant_id=args.get("tenant_id"))
    return paginate(stmt, Collection, args["limit"], args.get("cursor"))


def _embedder(name: str) -> ModelRuntime:
    """The active version of an embedding model (not a canary: a collection's vectors must all
    come from one embedding space); 404 if unknown, 400 if it can't embed, 503 if not loaded."""
    runtime = catalogue().get(name, param="embedding_model")
    service.require_capability(runtime, "embeddings")
    g.served_model = f"{runtime.name}/{runtime.spec.version}"
    audit.note(model=runtime.name, model_version=runtime.spec.version)
    return runtime


def create_collection(principal: Principal, body: dict[str, Any], default_model: str) -> Collection:
    try:
        runtime = _embedder(body.get("embedding_model") or default_model)
    except APIError as exc:
        if exc.param == "model":  # require_capability names the chat-style param
            exc.param = "embedding_model"
        raise
    collection = Collection(
        tenant_id=principal.tenant_id,
        name=body["name"],
        description=body["description"],
        embedding_model=runtime.name,
        dimensions=runtime.backend.embedding_dimensions(),
        created_by=principal.subject,
    )
    db.session.add(collection)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise APIError(
            409,
            f"This tenant already has a collection named {body['name']!r}.",
            code="collection_exists",
            param="name",
        ) from None
    return collection


def delete_collection(principal: Principal, collection_id: str) -> dict[str, Any]:
    """Chunks, documents, then the collection, each statement scoped to the tenant, in one
    transaction (SQLite does not enforce ON DELETE CASCADE without a pragma)."""
    collection = own_collection(principal, collection_id)
    scope = {"tenant_id": principal.tenant_id, "collection_id": collection.id}
    for model in (Chunk, Document):
        db.session.execute(delete(model).filter_by(**scope))
    db.session.execute(delete(Collection).filter_by(tenant_id=principal.tenant_id, id=collection.id))
    db.session.commit()
    vector_store().forget(collection.id)
    return {"id": collection.id, "deleted": True}


# embedding --------------------------------------------------------------------------------------
def _unit(vectors: np.ndarray) -> np.ndarray:
    """Unit rows, so every store's dot product is the cosine (upstream models may not normalise)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def _dimension_mismatch(collection: Collection, dims: int) -> APIError:
    return APIError(
        409,
        f"Model '{collection.embedding_model}' now returns {dims}-dimensional vectors; this collection "
        f"holds {collection.dimensions}-dimensional ones. Re-create the collection to re-embed.",
        code="embedding_dimension_mismatch",
    )


def _embed_query(principal: Principal, collection: Collection, text: str) -> tuple[np.ndarray, int]:
    runtime = _embedder(collection.embedding_model)
    result, _ = service.embed_texts(principal, runtime, [text])
    vector = _unit(result.vectors)[0]
    if collection.dimensions is not None and vector.shape[0] != collection.dimensions:
        raise _dimension_mismatch(collection, int(vector.shape[0]))
    return vector, result.prompt_tokens


# ingestion --------------------------------------------------------------------------------------
def ingest(principal: Principal, collection_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """Chunk, embed (one governed model call for the whole request) and store in one transaction:
    a request that fails anywhere stores nothing, and the collection's counters always agree
    with its rows."""
    collection = own_collection(principal, collection_id)
    documents = body["documents"]
    for index, document in enumerate(documents):
        if len(document["text"]) > MAX_DOCUMENT_CHARS:
            raise APIError(
                413,
                f"Document {index} is {len(document['text'])} characters; the limit is {MAX_DOCUMENT_CHARS}. "
                "Split it into several documents.",
                code="document_too_large",
                param=f"documents.{index}.text",
            )
    started = time.perf_counter()
    pieces = [chunking.split(document["text"]) for document in documents]
    chunk_ms = _ms(started)
    runtime = _embedder(collection.embedding_model)
    texts = [p.text for ps in pieces for p in ps]
    started = time.perf_counter()
    tokens, seen, vectors, dims = 0, texts, np.zeros((0, 0), np.float32), 0
    if texts:  # documents of only separators and control characters have nothing to embed
        result, seen = service.embed_texts(principal, runtime, texts)
        tokens, vectors = result.prompt_tokens, _unit(result.vectors)
        dims = int(vectors.shape[1])
    embed_ms = _ms(started)
    audit.note(input=seen, tokens_in=tokens, tokens_out=0)
    started = time.perf_counter()
    if texts:
        _pin_dimensions(db.session, principal, collection, dims)
    rows, position = [], 0
    for document, document_pieces in zip(documents, pieces, strict=True):
        row = Document(
            tenant_id=principal.tenant_id,
            collection_id=collection.id,
            meta=document["metadata"],
            chars=len(document["text"]),
            chunk_count=len(document_pieces),
            text_sha256=hashlib.sha256(document["text"].encode()).hexdigest(),
        )
        db.session.add(row)
        db.session.flush()  # the document's id, for its chunks
        chunk_rows = []
        for piece in document_pieces:
            chunk = Chunk(
                tenant_id=principal.tenant_id,
                collection_id=collection.id,
                document_id=row.id,
                ordinal=piece.ordinal,
                start_char=piece.start,
                end_char=piece.end,
                text=seen[position],  # what the model embedded: redacted where the policy redacts
                meta=document["metadata"],
                dimensions=dims,
                embedding=vectors[position],
            )
            db.session.add(chunk)
            chunk_rows.append(chunk)
            position += 1
        rows.append((row, chunk_rows))
    db.session.flush()
    # SQL increments, not read-modify-write: concurrent ingestions into one collection add up.
    db.session.execute(
        update(Collection)
        .where(Collection.tenant_id == principal.tenant_id, Collection.id == collection.id)
        .values(
            revision=Collection.revision + 1,
            document_count=Collection.document_count + len(documents),
            chunk_count=Collection.chunk_count + position,
        )
    )
    metrics.RAG_CHUNKS.labels(store=vector_store().name).inc(position)
    data = [
        {
            "id": row.id,
            "collection_id": collection.id,
            "meta": row.meta,
            "chars": row.chars,
            "chunk_count": row.chunk_count,
            "chunk_ids": [c.id for c in chunks],
            "created_at": row.created_at,
        }
        for row, chunks in rows
    ]
    db.session.commit()
    return {
        "collection_id": collection.id,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "timings": {"chunk_ms": chunk_ms, "embed_ms": embed_ms, "store_ms": _ms(started)},
    }


def _pin_dimensions(session: Session, principal: Principal, collection: Collection, dims: int) -> None:
    """A collection created before its model could tell its size takes the first batch's."""
    if collection.dimensions is None:
        session.execute(
            update(Collection)
            .where(
                Collection.tenant_id == principal.tenant_id,
                Collection.id == collection.id,
                Collection.dimensions.is_(None),
            )
            .values(dimensions=dims)
        )
        session.refresh(collection)
    if collection.dimensions != dims:
        raise _dimension_mismatch(collection, dims)


# search -----------------------------------------------------------------------------------------
def retrieve(
    principal: Principal, collection: Collection, query: str, top_k: int, conditions: tuple
) -> tuple[list[Hit], dict[str, Any]]:
    """The nearest chunks to `query`, with the embedding tokens and the timings of both steps."""
    started = time.perf_counter()
    vector, tokens = _embed_query(principal, collection, query)
    embed_ms = _ms(started)
    store = vector_store()
    started = time.perf_counter()
    hits = store.search(
        db.session, principal.tenant_id, collection.id, collection.revision, vector, top_k, conditions
    )
    metrics.RAG_RETRIEVAL.labels(store=store.name).observe(time.perf_counter() - started)
    return hits, {"tokens": tokens, "embed_ms": embed_ms, "retrieval_ms": _ms(started)}


def _hit(hit: Hit) -> dict[str, Any]:
    return {
        "chunk_id": hit.chunk_id,
        "document_id": hit.document_id,
        "ordinal": hit.ordinal,
        "score": round(hit.score, 6),
        "text": hit.text,
        "metadata": hit.metadata,
        "start_char": hit.start_char,
        "end_char": hit.end_char,
    }


def search(principal: Principal, collection_id: str, body: dict[str, Any]) -> dict[str, Any]:
    conditions = filters.parse(body.get("filter"))  # a bad filter costs no model call
    collection = own_collection(principal, collection_id)
    hits, measured = retrieve(principal, collection, body["query"], body["top_k"], conditions)
    audit.note(
        input=[body["query"]],
        tokens_in=measured["tokens"],
        tokens_out=0,
        output=[[h.chunk_id, round(h.score, 6)] for h in hits],
        details={"rag": {"collection_id": collection.id, "store": vector_store().name}},
    )
    return {
        "collection_id": collection.id,
        "store": vector_store().name,
        "data": [_hit(h) for h in hits],
        "usage": {"prompt_tokens": measured["tokens"], "total_tokens": measured["tokens"]},
        "timings": {"embed_ms": measured["embed_ms"], "retrieval_ms": measured["retrieval_ms"]},
    }


# chat -------------------------------------------------------------------------------------------
def _sources(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{n}] {hit.text}" for n, hit in enumerate(hits, start=1))


def _citations(hits: list[Hit], answer: str | None) -> list[dict[str, Any]]:
    """The sources as numbered for the model; with the answer, whether it cites each one (a
    stream's first event has no answer yet: its `rag.timings` event lists the numbers cited)."""
    cited = {int(n) for n in CITATION.findall(answer or "")}
    return [
        {"index": n, **({} if answer is None else {"cited": n in cited}), **_hit(hit)}
        for n, hit in enumerate(hits, start=1)
    ]


CHAT_FIELDS = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "user",
    "stream",
    "stream_options",
)


def rag_chat(principal: Principal, body: dict[str, Any]) -> dict[str, Any] | Response:
    """Retrieve for the last user message, then generate through the one governed chat path, with
    the chunks as numbered sources in a system message. The answer's citations are the chunks it
    was given, each with its score and text, flagged when the answer cites its number."""
    started = time.perf_counter()
    conditions = filters.parse(body.get("filter"))
    collection = own_collection(principal, body["collection_id"])
    question = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user" and m["content"])
    hits, measured = retrieve(principal, collection, question, body["top_k"], conditions)
    system = {"role": "system", "content": f"{SYSTEM_PROMPT}\n\nSources:\n\n{_sources(hits)}"}
    chat_body = {k: body[k] for k in CHAT_FIELDS if body.get(k) is not None}
    chat_body |= {"messages": [system, *body["messages"]], "n": 1}
    audit.note(
        details={
            "rag": {
                "collection_id": collection.id,
                "store": vector_store().name,
                "embedding_model": collection.embedding_model,
                "embedding_tokens": measured["tokens"],
                "chunk_ids": [h.chunk_id for h in hits],
            }
        }
    )
    timings = {"embed_ms": measured["embed_ms"], "retrieval_ms": measured["retrieval_ms"]}
    generation_started = time.perf_counter()
    if not body.get("stream"):
        completion = service.run_chat(principal, chat_body)
        timings |= {"generation_ms": _ms(generation_started), "total_ms": _ms(started)}
        answer = completion["choices"][0]["message"]["content"] or ""
        completion["usage"]["embedding_tokens"] = measured["tokens"]
        return {
            **completion,
            "collection_id": collection.id,
            "citations": _citations(hits, answer),
            "timings": timings,
        }
    response = service.chat_completion(principal, chat_body)
    assert isinstance(response, Response)
    response.response = _rag_events(
        response.response, collection.id, hits, timings, started, generation_started
    )
    return response


def _rag_events(
    chunks: Any,
    collection_id: str,
    hits: list[Hit],
    timings: dict[str, float],
    started: float,
    generation_started: float,
) -> Iterator[str]:
    """The chat stream, framed as every chat stream is, between two events of our own: first
    `rag.citations` (what the model was given), and just before `[DONE]` `rag.timings`, with the
    generation time and the numbers the answer cited. A stream that fails ends with its error
    event, as chat streams do, and no timings."""
    done = sse("[DONE]")
    answer: list[str] = []
    try:
        yield sse(
            {"object": "rag.citations", "collection_id": collection_id, "citations": _citations(hits, None)}
        )
        for event in chunks:
            if event == done:
                timings = {**timings, "generation_ms": _ms(generation_started), "total_ms": _ms(started)}
                cited = [c["index"] for c in _citations(hits, "".join(answer)) if c["cited"]]
                yield sse({"object": "rag.timings", "timings": timings, "cited": cited})
            elif event.startswith("data: {"):
                answer.append(_delta_text(event))
            yield event
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _delta_text(event: str) -> str:
    payload = json.loads(event[len("data: ") :])
    choices = payload.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or ""
