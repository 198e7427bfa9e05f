"""registry: required models

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 13:50:00.000000

A model marked `required` must be loaded for an instance to be ready. The catalogue's models are
required, so the models seeded from it (their versions were created by "seed") become required;
models added through the registry API default to not required.
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("registry_models") as batch:
        batch.add_column(sa.Column("required", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(
        "UPDATE registry_models SET required = TRUE"
        " WHERE id IN (SELECT model_id FROM model_versions WHERE created_by = 'seed')"
    )


def downgrade():
    with op.batch_alter_table("registry_models") as batch:
        batch.drop_column("required")
