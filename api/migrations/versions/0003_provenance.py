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
    # Plain ADD COLUMN (SQLite has it): a batch copy of `predictions` would drop the old table, and
    # with foreign keys on that cascades into video_predictions.
    op.add_column("predictions", sa.Column("provenance", sa.JSON()))
    op.add_column("predictions", sa.Column("declared_ai", sa.Boolean()))
    op.add_column("predictions", sa.Column("c2pa_present", sa.Boolean()))
    op.create_index("ix_predictions_declared_ai", "predictions", ["declared_ai"])


def downgrade() -> None:
    op.drop_index("ix_predictions_declared_ai", table_name="predictions")
    # Plain DROP COLUMN (SQLite 3.35+), for the same reason as above.
    for name in ("c2pa_present", "declared_ai", "provenance"):
        op.drop_column("predictions", name)
