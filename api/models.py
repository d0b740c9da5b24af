"""ORM models: every table the service stores. The schema itself is owned by Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime | None) -> str | None:
    """A row's timestamp as the API writes it: ISO 8601 in UTC with a Z."""
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite hands back naive UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class Base(DeclarativeBase):
    pass


class Prediction(Base):
    """One image or video verdict (or a video job on its way to one)."""

    __tablename__ = "predictions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    media_type: Mapped[str] = mapped_column(String(16), nullable=False)  # image | video
    filename: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    prediction: Mapped[str | None] = mapped_column(String(8))  # fake | real; null until a job is done
    fake_probability: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    model_version: Mapped[str] = mapped_column(String(255), nullable=False)
    processing_ms: Mapped[float | None] = mapped_column(Float)
    result_object: Mapped[str | None] = mapped_column(String(255))
    media_object: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="done")  # queued|running|done|failed
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str | None] = mapped_column(String(64))  # API key id that made it; null = anonymous
    # What the file's metadata claims (api/utils/provenance.py), beside the verdict, never in it.
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    declared_ai: Mapped[bool | None] = mapped_column(Boolean)
    c2pa_present: Mapped[bool | None] = mapped_column(Boolean)

    video: Mapped[VideoPrediction | None] = relationship(
        back_populates="prediction", uselist=False, cascade="all, delete-orphan", lazy="selectin")

    __table_args__ = (
        Index("ix_predictions_created_at", "created_at"),
        Index("ix_predictions_owner_created_at", "owner", "created_at"),
        Index("ix_predictions_prediction_created_at", "prediction", "created_at"),
        Index("ix_predictions_media_type_created_at", "media_type", "created_at"),
        Index("ix_predictions_sha256", "sha256"),
        Index("ix_predictions_fake_probability", "fake_probability"),
        Index("ix_predictions_status", "status"),
        Index("ix_predictions_declared_ai", "declared_ai"),
    )


class VideoPrediction(Base):
    """The time-series detail of a video's or a recording's prediction: probing facts, aggregates and job state.

    Named for videos, which came first; a recording (media_type audio) keeps its windows here too:
    `frames_analyzed` counts windows and `top_frames` holds the top windows.
    """

    __tablename__ = "video_predictions"

    prediction_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True)
    duration_s: Mapped[float | None] = mapped_column(Float)
    fps: Mapped[float | None] = mapped_column(Float)
    frame_count: Mapped[int | None] = mapped_column(Integer)
    codec: Mapped[str | None] = mapped_column(String(32))
    container: Mapped[str | None] = mapped_column(String(32))
    frames_analyzed: Mapped[int | None] = mapped_column(Integer)
    aggregation: Mapped[str] = mapped_column(String(16), nullable=False, default="mean")
    mean_probability: Mapped[float | None] = mapped_column(Float)
    vote_share: Mapped[float | None] = mapped_column(Float)
    max_probability: Mapped[float | None] = mapped_column(Float)
    frames_object: Mapped[str | None] = mapped_column(String(255))
    upload_object: Mapped[str | None] = mapped_column(String(255))  # kept for re-queueing async jobs
    progress_done: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    segments: Mapped[list[Any] | None] = mapped_column(JSON)
    top_frames: Mapped[list[Any] | None] = mapped_column(JSON)
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_status: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    # Queue bookkeeping of an async job (written only by api/services/jobs.py): who holds the claim,
    # since when, its last sign of life, how many claims it has had and how often it was re-queued.
    worker: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    requeued: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")

    prediction: Mapped[Prediction] = relationship(back_populates="video")


class ApiKey(Base):
    """An API key, stored only as a hash of the secret."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # public part, shown in listings
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(128), nullable=False)
    is_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ModelVersion(Base):
    """A head the service can serve (api/services/model_versions.py): its checkpoint and model card live
    in the models bucket; `id` is the head's identity in every model_version string (sha256:<12 hex>)."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), unique=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    head_object: Mapped[str] = mapped_column(String(255), nullable=False)
    card_object: Mapped[str | None] = mapped_column(String(255))
    card: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # a copy, so listings need no object reads
    threshold: Mapped[float | None] = mapped_column(Float)  # the card's default threshold
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class ActiveModel(Base):
    """Which version answers now: one row per detector (`slot` "d3"); version_id null = the configured
    head (D3_HEAD_WEIGHTS). Every model-serving process polls this row."""

    __tablename__ = "active_model"

    slot: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("model_versions.id"))
    activated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    activated_by: Mapped[str | None] = mapped_column(String(128))
