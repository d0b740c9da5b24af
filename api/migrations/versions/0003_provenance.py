"""Provenance beside the verdict: the metadata block, declared_ai and c2pa_present.

Rows written before this revision have no provenance (null: it was never read).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("provenance", sa.JSON()))
        batch.add_column(sa.Column("declared_ai", sa.Boolean()))
        batch.add_column(sa.Column("c2pa_present", sa.Boolean()))
    op.create_index("ix_predictions_declared_ai", "predictions", ["declared_ai"])


def downgrade() -> None:
    op.drop_index("ix_predictions_declared_ai", table_name="predictions")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("c2pa_present")
        batch.drop_column("declared_ai")
        batch.drop_column("provenance")
