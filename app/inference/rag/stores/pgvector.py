"""pgvector on PostgreSQL: approximate nearest neighbours from an HNSW index, filters in SQL.

The query orders by `embedding::vector(<dims>) <=> :query` under `WHERE dimensions = <dims>`,
which is exactly the partial expression index migration 0006 creates (for 384 dimensions; a
collection of another size gets an exact scan until its index exists). The tenant, the collection
and the metadata filter are in the same WHERE. An HNSW scan returns `ef_search` candidates and
PostgreSQL filters them afterwards, so a small collection in a large table, or a selective filter,
could come back short; pgvector 0.8's iterative scan (`hnsw.iterative_scan = strict_order`) keeps
walking the graph until `top_k` rows pass the filter, in distance order. When the tenant and
collection narrow the rows enough, the planner skips the HNSW index for the btree one and sorts
exactly, which is right for small collections.

The distance is cosine (`vector_cosine_ops`); the score returned is 1 - distance, the cosine
similarity, as the exact store computes it.
"""

from __future__ import annotations

import numpy as np
from pgvector.sqlalchemy import VECTOR
from sqlalchemy import Float, case, cast, func, literal_column, not_, or_, select, text, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.inference.rag.filters import COMPARISONS, Condition
from app.inference.rag.models import Chunk
from app.inference.rag.stores.base import HIT_COLUMNS, Hit, VectorStore, hit_from

EF_SEARCH_MIN = 40  # pgvector's default


def _condition(condition: Condition) -> ColumnElement[bool]:
    metadata = type_coerce(Chunk.meta, JSONB)
    if condition.op in COMPARISONS:
        value = metadata[condition.key]
        # CASE, not AND: PostgreSQL may evaluate AND's operands in any order, and a cast of a
        # string value to float would raise instead of not matching.
        number = case((func.jsonb_typeof(value) == "number", value.astext.cast(Float)), else_=None)
        compare = {"$gt": number > condition.value, "$gte": number >= condition.value}
        compare |= {"$lt": number < condition.value, "$lte": number <= condition.value}
        return compare[condition.op]
    if condition.op == "$in":
        return or_(*(metadata.contains({condition.key: v}) for v in condition.value))
    equal = metadata.contains({condition.key: condition.value})
    return not_(equal) if condition.op == "$ne" else equal


class PgVectorStore(VectorStore):
    name = "pgvector"

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
        dims = int(query.shape[0])
        distance = cast(Chunk.embedding, VECTOR(dims)).cosine_distance(query.astype(np.float32))
        # A literal, not a bind parameter: the planner must see `dimensions = 384` to use the
        # partial index. `dims` is an int from the model's vector, never client text.
        stmt = (
            select(*HIT_COLUMNS, distance.label("distance"))
            .where(
                Chunk.tenant_id == tenant_id,
                Chunk.collection_id == collection_id,
                Chunk.dimensions == literal_column(str(dims)),
                *(_condition(c) for c in conditions),
            )
            .order_by(distance)
            .limit(top_k)
        )
        session.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
        session.execute(text(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH_MIN, 2 * int(top_k))}"))
        return [hit_from(row, 1.0 - float(row.distance)) for row in session.execute(stmt)]
