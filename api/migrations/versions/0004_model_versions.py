"""Model versions: the heads the service can switch between, and which one answers now.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), unique=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("head_object", sa.String(255), nullable=False),
        sa.Column("card_object", sa.String(255)),
        sa.Column("card", sa.JSON()),
        sa.Column("threshold", sa.Float()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    active = op.create_table(
        "active_model",
        sa.Column("slot", sa.String(32), primary_key=True),
        sa.Column("version_id", sa.String(64), sa.ForeignKey("model_versions.id")),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_by", sa.String(128)),
    )
    # The D3 slot exists from the start, pointing at nothing: the configured head answers.
    op.bulk_insert(active, [{"slot": "d3", "version_id": None, "activated_at": datetime.now(timezone.utc),
                             "activated_by": None}])


def downgrade() -> None:
    op.drop_table("active_model")
    op.drop_table("model_versions")
