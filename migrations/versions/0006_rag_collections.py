"""rag: collections, documents and their embedded chunks

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 17:00:00.000000

On PostgreSQL the chunk embedding is a pgvector `vector` without a fixed dimension, so one table
holds collections embedded by models of any size; each row records its `dimensions`. An HNSW
index needs one dimension, so it is a partial expression index per dimension: this revision
creates the one for 384 (all-MiniLM-L6-v2, the default embedding model). A collection of another
dimension is still searched correctly (an exact scan inside PostgreSQL) until an operator adds
its index the same way (see README, "Retrieval-augmented generation"). On SQLite the embedding is
a float32 blob, scanned exactly in process.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

HNSW_DIMENSIONS = 384


def upgrade():
    postgres = op.get_bind().dialect.name == "postgresql"
    json_type = postgresql.JSONB() if postgres else sa.JSON()
    if postgres:
        from pgvector.sqlalchemy import VECTOR

        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
        embedding_type = VECTOR()
    else:
        embedding_type = sa.LargeBinary()
    op.create_table(
        "rag_collections",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("embedding_model", sa.String(length=128), nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("document_count", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_rag_collections_tenant_name"),
    )
    op.create_index("ix_rag_collections_tenant_created", "rag_collections", ["tenant_id", "created_at"])
    op.create_table(
        "rag_documents",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("collection_id", sa.String(length=32), nullable=False),
        sa.Column("metadata", json_type, nullable=False),
        sa.Column("chars", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("text_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["collection_id"], ["rag_collections.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_rag_documents_collection_created", "rag_documents", ["tenant_id", "collection_id", "created_at"]
    )
    op.create_table(
        "rag_chunks",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("collection_id", sa.String(length=32), nullable=False),
        sa.Column("document_id", sa.String(length=32), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("start_char", sa.Integer(), nullable=False),
        sa.Column("end_char", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("metadata", json_type, nullable=False),
        sa.Column("dimensions", sa.Integer(), nullable=False),
        sa.Column("embedding", embedding_type, nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["collection_id"], ["rag_collections.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["document_id"], ["rag_documents.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_rag_chunks_collection", "rag_chunks", ["tenant_id", "collection_id"])
    op.create_index("ix_rag_chunks_document", "rag_chunks", ["document_id", "ordinal"])
    if postgres:
        op.execute(
            f"CREATE INDEX ix_rag_chunks_hnsw_{HNSW_DIMENSIONS} ON rag_chunks USING hnsw "
            f"((embedding::vector({HNSW_DIMENSIONS})) vector_cosine_ops) WHERE dimensions = {HNSW_DIMENSIONS}"
        )


def downgrade():
    op.drop_table("rag_chunks")  # its indexes, the HNSW one included, go with it
    op.drop_index("ix_rag_documents_collection_created", table_name="rag_documents")
    op.drop_table("rag_documents")
    op.drop_index("ix_rag_collections_tenant_created", table_name="rag_collections")
    op.drop_table("rag_collections")
