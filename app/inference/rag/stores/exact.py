"""Exact nearest neighbours in process: the store for SQLite, the embedded default.

Measured before choosing (2026-12-03, this 2-core machine, 384-dim unit vectors, top 5, 20
queries; `/tmp/vecmeasure.py`, in the RAG report): sqlite-vec 0.1.9's `vec0` table took 14 ms a
query at 10k rows and 122 ms at 100k; a numpy matrix product over the same vectors held in
memory took 7 ms and 63 ms. The scan wins by 2x, needs no native extension, and sqlite-vec can't
even load here: the project's Python is built without `enable_load_extension`. So the collection's
vectors are read once into a float32 matrix, kept per process (LRU, bounded by RAG_EXACT_CACHE_MB)
and rebuilt when the collection's `revision` moves, which every worker sees in the row it reads.

The scan is exact, so its recall is the embedding model's; its cost grows linearly with the
collection (see bench/results/RAG.md). The matrix product runs in a real OS thread (numpy
releases the GIL), so a large collection does not stall the gevent hub.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.inference.offload import run_in_thread
from app.inference.rag.filters import Condition, matches
from app.inference.rag.models import Chunk
from app.inference.rag.stores.base import HIT_COLUMNS, Hit, VectorStore, hit_from


@dataclass
class _Matrix:
    revision: int
    ids: list[str]
    metadata: list[dict[str, Any]]
    vectors: np.ndarray  # (n, dims) float32, unit rows

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes) + 200 * len(self.ids)


def _top(vectors: np.ndarray, query: np.ndarray, mask: np.ndarray | None, k: int) -> tuple[Any, Any]:
    scores = vectors @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return np.empty(0, dtype=np.int64), scores[:0]
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best, scores[best]


class ExactStore(VectorStore):
    name = "exact"

    def __init__(self, cache_bytes: int) -> None:
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], _Matrix] = OrderedDict()
        self._lock = threading.Lock()

    def _matrix(self, session: Session, tenant_id: str, collection_id: str, revision: int) -> _Matrix:
        key = (tenant_id, collection_id)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached.revision == revision:
                self._cache.move_to_end(key)
                return cached
        rows = session.execute(
            select(Chunk.id, Chunk.meta, Chunk.embedding)
            .where(Chunk.tenant_id == tenant_id, Chunk.collection_id == collection_id)
            .order_by(Chunk.id)
        ).all()
        vectors = np.vstack([r.embedding for r in rows]).astype(np.float32) if rows else np.zeros((0, 1))
        matrix = _Matrix(revision, [r.id for r in rows], [r.meta for r in rows], vectors)
        with self._lock:
            self._cache.pop(key, None)
            if matrix.nbytes <= self.cache_bytes:
                self._cache[key] = matrix
                while sum(m.nbytes for m in self._cache.values()) > self.cache_bytes:
                    self._cache.popitem(last=False)
        return matrix

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
        matrix = self._matrix(session, tenant_id, collection_id, revision)
        if not matrix.ids or matrix.vectors.shape[1] != query.shape[0]:
            return []
        mask = np.fromiter((matches(m, conditions) for m in matrix.metadata), bool) if conditions else None
        best, scores = run_in_thread(_top, matrix.vectors, query.astype(np.float32), mask, top_k)
        if len(best) == 0:
            return []
        wanted = [matrix.ids[i] for i in best]
        rows = {
            row.id: row
            for row in session.execute(
                select(*HIT_COLUMNS).where(
                    Chunk.tenant_id == tenant_id, Chunk.collection_id == collection_id, Chunk.id.in_(wanted)
                )
            )
        }
        return [
            hit_from(row, float(score))
            for chunk_id, score in zip(wanted, scores, strict=True)
            if (row := rows.get(chunk_id)) is not None  # deleted since the matrix was read
        ]

    def forget(self, collection_id: str) -> None:
        with self._lock:
            for key in [k for k in self._cache if k[1] == collection_id]:
                del self._cache[key]
