"""Job bookkeeping in columns: worker, claimed_at, heartbeat_at, attempts, requeued.

Before this revision the claim lived in `video_predictions.params` (JSON keys worker, claimed_at,
requeued, attempts); those keys move to the new columns and leave the JSON, so a row written by
the old code reads exactly like a new one. The heartbeat was `updated_at`: it seeds heartbeat_at.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

MOVED = ("worker", "claimed_at", "requeued", "attempts")

videos = sa.table(
    "video_predictions",
    sa.column("prediction_id", sa.Uuid()),
    sa.column("params", sa.JSON()),
    sa.column("updated_at", sa.DateTime(timezone=True)),
    sa.column("worker", sa.String(128)),
    sa.column("claimed_at", sa.DateTime(timezone=True)),
    sa.column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.column("attempts", sa.Integer()),
    sa.column("requeued", sa.Integer()),
)


def _when(value):
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _count(value) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def upgrade() -> None:
    with op.batch_alter_table("video_predictions") as batch:
        batch.add_column(sa.Column("worker", sa.String(128)))
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("requeued", sa.Integer(), nullable=False, server_default="0"))
    conn = op.get_bind()
    # Row by row in Python: the JSON functions of SQLite and PostgreSQL differ, and only video rows exist here.
    for prediction_id, params, updated_at in conn.execute(
            sa.select(videos.c.prediction_id, videos.c.params, videos.c.updated_at)).all():
        params = dict(params or {})
        moved = {key: params.pop(key) for key in MOVED if key in params}
        worker = moved.get("worker")
        conn.execute(videos.update().where(videos.c.prediction_id == prediction_id).values(
            params=params, worker=str(worker)[:128] if worker else None, claimed_at=_when(moved.get("claimed_at")),
            heartbeat_at=updated_at, attempts=_count(moved.get("attempts", 1 if worker else 0)),
            requeued=_count(moved.get("requeued"))))


def downgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(videos)).mappings().all():
        params = dict(row["params"] or {})
        if row["worker"]:
            params["worker"] = row["worker"]
        if row["claimed_at"]:
            params["claimed_at"] = row["claimed_at"].isoformat()
        if row["requeued"]:
            params["requeued"] = row["requeued"]
        if row["attempts"]:
            params["attempts"] = row["attempts"]
        conn.execute(videos.update().where(videos.c.prediction_id == row["prediction_id"]).values(params=params))
    with op.batch_alter_table("video_predictions") as batch:
        for name in ("requeued", "attempts", "heartbeat_at", "claimed_at", "worker"):
            batch.drop_column(name)
