"""Reading past predictions: filtered listing with cursors, one record, and statistics."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.sql import Select

from api.database import Database
from api.exceptions import InvalidInput, NotFound
from api.models import Prediction

MAX_LIMIT = 500
DEFAULT_LIMIT = 50
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Filters:
    prediction: str | None = None
    media_type: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_probability: float | None = None
    max_probability: float | None = None
    sha256: str | None = None
    filename: str | None = None
    declared_ai: str | None = None  # true | false | unknown (no claim in the metadata)
    c2pa: bool | None = None  # a C2PA manifest was present


# -- parsing query parameters (strings in, typed values out, InvalidInput naming the parameter) ------
def parse_time(name: str, raw: str | None) -> datetime | None:
    if raw is None or raw == "":
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"{name} must be an ISO 8601 date or date-time, got {raw!r}", parameter=name) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_probability(name: str, raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a number between 0 and 1, got {raw!r}", parameter=name) from None
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise InvalidInput(f"{name} must be between 0 and 1, got {raw!r}", parameter=name)
    return value


def parse_int(name: str, raw: str | None, default: int, minimum: int, maximum: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer, got {raw!r}", parameter=name) from None
    if not minimum <= value <= maximum:
        raise InvalidInput(f"{name} must be between {minimum} and {maximum}, got {value}", parameter=name)
    return value


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...]) -> str | None:
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise InvalidInput(f"{name} must be one of {', '.join(choices)}, got {raw!r}", parameter=name)
    return raw


def parse_filters(args: dict[str, str]) -> Filters:
    sha = args.get("sha256") or None
    if sha is not None and not _SHA256.match(sha.lower()):
        raise InvalidInput("sha256 must be 64 hexadecimal characters", parameter="sha256")
    filters = Filters(
        prediction=parse_choice("prediction", args.get("prediction"), ("fake", "real")),
        media_type=parse_choice("media_type", args.get("media_type"), ("image", "video")),
        status=parse_choice("status", args.get("status"), ("queued", "running", "done", "failed")),
        since=parse_time("since", args.get("since")),
        until=parse_time("until", args.get("until")),
        min_probability=parse_probability("min_probability", args.get("min_probability")),
        max_probability=parse_probability("max_probability", args.get("max_probability")),
        sha256=sha.lower() if sha else None,
        filename=(args.get("filename") or None),
        declared_ai=parse_choice("declared_ai", args.get("declared_ai"), ("true", "false", "unknown")),
        c2pa={"true": True, "false": False, None: None}[parse_choice("c2pa", args.get("c2pa"), ("true", "false"))],
    )
    if filters.since and filters.until and filters.since > filters.until:
        raise InvalidInput("since must not be after until", parameter="since")
    if (filters.min_probability is not None and filters.max_probability is not None
            and filters.min_probability > filters.max_probability):
        raise InvalidInput("min_probability must not exceed max_probability", parameter="min_probability")
    if filters.filename is not None and len(filters.filename) > 255:
        raise InvalidInput("filename filter is longer than 255 characters", parameter="filename")
    return filters


def encode_cursor(row: Prediction) -> str:
    created = row.created_at.replace(tzinfo=None) if row.created_at.tzinfo is None else \
        row.created_at.astimezone(timezone.utc).replace(tzinfo=None)
    raw = json.dumps([created.isoformat(), str(row.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created_raw, id_raw = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created = datetime.fromisoformat(created_raw).replace(tzinfo=timezone.utc)
        return created, uuid.UUID(id_raw)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("cursor is not valid; use the next_cursor of a previous page", parameter="cursor") from None


# -- the queries -----------------------------------------------------------
def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _apply(query: Select, filters: Filters, owner_scope: str | None, all_owners: bool) -> Select:
    if not all_owners:
        query = query.where(Prediction.owner.is_(None) if owner_scope is None else Prediction.owner == owner_scope)
    if filters.prediction:
        query = query.where(Prediction.prediction == filters.prediction)
    if filters.media_type:
        query = query.where(Prediction.media_type == filters.media_type)
    if filters.status:
        query = query.where(Prediction.status == filters.status)
    if filters.since:
        query = query.where(Prediction.created_at >= filters.since)
    if filters.until:
        query = query.where(Prediction.created_at <= filters.until)
    if filters.min_probability is not None:
        query = query.where(Prediction.fake_probability >= filters.min_probability)
    if filters.max_probability is not None:
        query = query.where(Prediction.fake_probability <= filters.max_probability)
    if filters.sha256:
        query = query.where(Prediction.sha256 == filters.sha256)
    if filters.declared_ai is not None:
        claim = {"true": True, "false": False, "unknown": None}[filters.declared_ai]
        query = query.where(Prediction.declared_ai.is_(claim))
    if filters.c2pa is not None:
        query = query.where(Prediction.c2pa_present.is_(filters.c2pa))
    if filters.filename:
        pattern = f"%{_escape_like(filters.filename.lower())}%"
        query = query.where(func.lower(Prediction.filename).like(pattern, escape="\\"))
    return query


class QueryService:
    """Owner scoping: `owner` is the caller's key id (None = anonymous); `all_owners` for admins."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def list(self, filters: Filters, limit: int, offset: int, cursor: str | None, owner: str | None,
             all_owners: bool) -> tuple[list[Prediction], int, str | None]:
        base = _apply(select(Prediction), filters, owner, all_owners)
        count_query = _apply(select(func.count()).select_from(Prediction), filters, owner, all_owners)
        page = base.order_by(Prediction.created_at.desc(), Prediction.id.desc())
        if cursor:
            created, last_id = decode_cursor(cursor)
            page = page.where(or_(Prediction.created_at < created,
                                  and_(Prediction.created_at == created, Prediction.id < last_id)))
        else:
            page = page.offset(offset)
        page = page.limit(limit + 1)  # one extra row says whether there is a next page
        with self.db.session() as session:
            rows = list(session.scalars(page))
            total = session.scalar(count_query) or 0
        next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
        return rows[:limit], total, next_cursor

    def get(self, prediction_id: str, owner: str | None, all_owners: bool) -> Prediction:
        try:
            key = uuid.UUID(prediction_id)
        except ValueError:
            raise NotFound(f"no prediction with id {prediction_id!r}") from None
        with self.db.session() as session:
            row = session.get(Prediction, key)
        # Another client's record is reported exactly like a missing one.
        if row is None or (not all_owners and row.owner != owner):
            raise NotFound(f"no prediction with id {prediction_id!r}")
        return row

    def stats(self, since: datetime | None, until: datetime | None, owner: str | None,
              all_owners: bool) -> dict[str, Any]:
        until = until or datetime.now(timezone.utc)
        since = since or until - timedelta(days=30)
        if since > until:
            raise InvalidInput("since must not be after until", parameter="since")
        filters = Filters(since=since, until=until)

        def scoped(query: Select) -> Select:
            return _apply(query, filters, owner, all_owners)

        done = Prediction.status == "done"
        with self.db.session() as session:
            by_prediction = dict(session.execute(scoped(
                select(Prediction.prediction, func.count()).where(done).group_by(Prediction.prediction))).all())
            by_media = dict(session.execute(scoped(
                select(Prediction.media_type, func.count()).group_by(Prediction.media_type))).all())
            by_status = dict(session.execute(scoped(
                select(Prediction.status, func.count()).group_by(Prediction.status))).all())
            by_declared_ai = dict(session.execute(scoped(
                select(Prediction.declared_ai, func.count()).group_by(Prediction.declared_ai))).all())
            with_c2pa = session.scalar(scoped(
                select(func.count()).select_from(Prediction).where(Prediction.c2pa_present.is_(True))))
            day = func.date(Prediction.created_at)
            per_day = session.execute(scoped(
                select(day, func.count()).group_by(day).order_by(day))).all()
            mean_probability, mean_ms, timed = session.execute(scoped(select(
                func.avg(Prediction.fake_probability), func.avg(Prediction.processing_ms),
                func.count(Prediction.processing_ms)).where(done))).one()
            p95 = None
            if timed:
                # Nearest-rank percentile, portable across SQLite and PostgreSQL.
                rank = max(0, math.ceil(0.95 * timed) - 1)
                p95 = session.scalar(scoped(
                    select(Prediction.processing_ms).where(done, Prediction.processing_ms.is_not(None))
                    .order_by(Prediction.processing_ms).offset(rank).limit(1)))
        return {
            "since": since.isoformat().replace("+00:00", "Z"),
            "until": until.isoformat().replace("+00:00", "Z"),
            "total": sum(by_media.values()),
            "by_prediction": {"fake": by_prediction.get("fake", 0), "real": by_prediction.get("real", 0)},
            "by_media_type": {"image": by_media.get("image", 0), "video": by_media.get("video", 0)},
            "by_status": {k: by_status.get(k, 0) for k in ("queued", "running", "done", "failed")},
            # What the metadata claimed (docs/PROVENANCE.md); unknown includes records made before it was read.
            "by_declared_ai": {"true": by_declared_ai.get(True, 0), "false": by_declared_ai.get(False, 0),
                               "unknown": by_declared_ai.get(None, 0)},
            "c2pa_present": with_c2pa or 0,
            "per_day": [{"date": str(d), "count": c} for d, c in per_day],
            "mean_fake_probability": None if mean_probability is None else float(mean_probability),
            "processing_ms": {"mean": None if mean_ms is None else float(mean_ms),
                              "p95": None if p95 is None else float(p95)},
        }
