"""Initial schema: predictions, video_predictions, api_keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("media_type", sa.String(16), nullable=False),
        sa.Column("filename", sa.String(255)),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer()),
        sa.Column("height", sa.Integer()),
        sa.Column("prediction", sa.String(8)),
        sa.Column("fake_probability", sa.Float()),
        sa.Column("confidence", sa.Float()),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("model_version", sa.String(255), nullable=False),
        sa.Column("processing_ms", sa.Float()),
        sa.Column("result_object", sa.String(255)),
        sa.Column("media_object", sa.String(255)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("owner", sa.String(64)),
    )
    op.create_index("ix_predictions_created_at", "predictions", ["created_at"])
    op.create_index("ix_predictions_owner_created_at", "predictions", ["owner", "created_at"])
    op.create_index("ix_predictions_prediction_created_at", "predictions", ["prediction", "created_at"])
    op.create_index("ix_predictions_media_type_created_at", "predictions", ["media_type", "created_at"])
    op.create_index("ix_predictions_sha256", "predictions", ["sha256"])
    op.create_index("ix_predictions_fake_probability", "predictions", ["fake_probability"])
    op.create_index("ix_predictions_status", "predictions", ["status"])

    op.create_table(
        "video_predictions",
        sa.Column("prediction_id", sa.Uuid(), sa.ForeignKey("predictions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("duration_s", sa.Float()),
        sa.Column("fps", sa.Float()),
        sa.Column("frame_count", sa.Integer()),
        sa.Column("codec", sa.String(32)),
        sa.Column("container", sa.String(32)),
        sa.Column("frames_analyzed", sa.Integer()),
        sa.Column("aggregation", sa.String(16), nullable=False),
        sa.Column("mean_probability", sa.Float()),
        sa.Column("vote_share", sa.Float()),
        sa.Column("max_probability", sa.Float()),
        sa.Column("frames_object", sa.String(255)),
        sa.Column("upload_object", sa.String(255)),
        sa.Column("progress_done", sa.Integer(), nullable=False),
        sa.Column("progress_total", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("segments", sa.JSON()),
        sa.Column("top_frames", sa.JSON()),
        sa.Column("callback_url", sa.Text()),
        sa.Column("callback_status", sa.String(64)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key_hash", sa.String(128), nullable=False),
        sa.Column("is_admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("video_predictions")
    op.drop_index("ix_predictions_status", "predictions")
    op.drop_index("ix_predictions_fake_probability", "predictions")
    op.drop_index("ix_predictions_sha256", "predictions")
    op.drop_index("ix_predictions_media_type_created_at", "predictions")
    op.drop_index("ix_predictions_prediction_created_at", "predictions")
    op.drop_index("ix_predictions_owner_created_at", "predictions")
    op.drop_index("ix_predictions_created_at", "predictions")
    op.drop_table("predictions")
