"""The vector-store interface: the write path is shared SQL, the search is each store's own.

Chunks are rows of `rag_chunks` in the gateway's database whichever store searches them, so a
document, its chunks and its collection's counters change in one transaction, and a failed
ingestion leaves nothing behind. A store decides how a search finds the nearest chunks:
`exact` scans unit vectors in process (SQLite), `pgvector` asks PostgreSQL's HNSW index. A new
store is a new module with a `VectorStore` subclass, picked in `stores.store_for`.

Every search is scoped by construction: it takes the tenant id and the collection id, and both
are in the WHERE clause of every query it makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sqlalchemy.orm import Session

from app.inference.rag.filters import Condition
from app.inference.rag.models import Chunk


@dataclass(frozen=True)
class Hit:
    chunk_id: str
    document_id: str
    ordinal: int
    score: float  # cosine similarity, in [-1, 1]
    text: str
    metadata: dict[str, Any]
    start_char: int
    end_char: int


# What a search returns of each chunk (never the embedding: it is large and the caller has no use for it).
HIT_COLUMNS = (
    Chunk.id,
    Chunk.document_id,
    Chunk.ordinal,
    Chunk.text,
    Chunk.meta,
    Chunk.start_char,
    Chunk.end_char,
)


def hit_from(row: Any, score: float) -> Hit:
    return Hit(
        chunk_id=row.id,
        document_id=row.document_id,
        ordinal=row.ordinal,
        score=score,
        text=row.text,
        metadata=row.meta,
        start_char=row.start_char,
        end_char=row.end_char,
    )


class VectorStore:
    name: ClassVar[str] = ""

    def search(
        self,
        session: Session,
        tenant_id: str,
        collection_id: str,
        revision: int,
        query: np.ndarray,
        top_k: int,
        conditions: tuple[Condition, ...],
    ) -> list[Hit]:
        """The `top_k` chunks most similar to the unit vector `query` that satisfy `conditions`,
        best first. `revision` is the collection's, as read in this request: a store that keeps
        an in-process index rebuilds it when the revision moved."""
        raise NotImplementedError

    def forget(self, collection_id: str) -> None:
        """Drop whatever this process holds for a collection (it was deleted)."""
