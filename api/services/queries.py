"""Reading past predictions: filtered listing with cursors, one record, and statistics."""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.sql import Select

from api.database import Database
from api.exceptions import InvalidInput, NotFound
from api.models import Prediction

MAX_LIMIT = 500
MEDIA_TYPES = ("image", "video", "audio", "text")
DEFAULT_LIMIT = 50
MAX_OFFSET = 10_000_000


@dataclass(frozen=True)
class Filters:
    """A listing's filters (the route fills them from its schema; a cursor carries them back)."""

    prediction: Literal["fake", "real"] | None = None
    media_type: Annotated[str, Field(pattern="^[a-z]{1,16}$")] | None = None
    status: Literal["queued", "running", "done", "failed"] | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_probability: Annotated[float, Field(ge=0, le=1)] | None = None
    max_probability: Annotated[float, Field(ge=0, le=1)] | None = None
    sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = None
    filename: Annotated[str, Field(max_length=255, pattern="^[^\x00]*$")] | None = None  # PostgreSQL: no NUL
    declared_ai: Literal["true", "false", "unknown"] | None = None  # unknown: no claim in the metadata
    c2pa: bool | None = None  # a C2PA manifest was present


_FILTERS = TypeAdapter(Filters)  # checks what a cursor carries back with the filters' own types


# -- cursors: the position after a page's last row, and the filters and page size of that listing ----
@dataclass(frozen=True)
class Cursor:
    created: datetime
    last_id: uuid.UUID
    filters: Filters
    limit: int


def _filters_json(filters: Filters) -> dict[str, Any]:
    values = {name: getattr(filters, name) for name in Filters.__dataclass_fields__}
    return {name: value.isoformat() if isinstance(value, datetime) else value
            for name, value in values.items() if value is not None}


# A cursor is base64url JSON of the last row's (created_at, id), the filters and the page size. Not
# signed (itsdangerous): it grants nothing, the owner scope is applied on every page and its filters
# are re-validated; a keyset library (sqlakeyset) would not carry the filters along.
def encode_cursor(row: Prediction, filters: Filters, limit: int) -> str:
    created = row.created_at.replace(tzinfo=None) if row.created_at.tzinfo is None else \
        row.created_at.astimezone(timezone.utc).replace(tzinfo=None)
    raw = json.dumps({"after": [created.isoformat(), str(row.id)], "limit": limit,
                      "filters": _filters_json(filters)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Cursor:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        created_raw, id_raw = data["after"]
        created = datetime.fromisoformat(created_raw).replace(tzinfo=timezone.utc)
        stored = data["filters"]
        if not isinstance(stored, dict) or set(stored) - set(Filters.__dataclass_fields__):
            raise ValueError("unknown filter")
        # The filters' own types and bounds: a cursor cannot smuggle in what a filter refuses.
        filters = _FILTERS.validate_python(stored)
        limit = data["limit"]
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError("bad limit")
        return Cursor(created=created, last_id=uuid.UUID(id_raw), filters=filters, limit=limit)
    except (ValueError, TypeError, KeyError, AttributeError, ValidationError, binascii.Error,
            json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("cursor is not valid; use the next_cursor of a previous page", parameter="cursor") from None


def apply_cursor(filters: Filters, limit: int | None, cursor: str | None) -> tuple[Filters, int]:
    """The filters and page size of a listing: a cursor's own, which the request may repeat but not change.

    Following `next_cursor` alone continues the same listing; a filter or limit that differs from the
    cursor's would silently mix two listings, so it is refused (start again without the cursor).
    """
    if not cursor:
        return filters, DEFAULT_LIMIT if limit is None else limit
    position = decode_cursor(cursor)
    for name in Filters.__dataclass_fields__:
        given = getattr(filters, name)
        if given is not None and given != getattr(position.filters, name):
            raise InvalidInput(f"{name} differs from the listing this cursor continues; follow next_cursor "
                               "without changing the filters, or start a new listing without a cursor",
                               parameter=name)
    if limit is not None and limit != position.limit:
        raise InvalidInput(f"limit {limit} differs from the cursor's page size {position.limit}; follow "
                           "next_cursor without it, or start a new listing without a cursor", parameter="limit")
    return position.filters, position.limit


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
            position = decode_cursor(cursor)
            page = page.where(or_(Prediction.created_at < position.created,
                                  and_(Prediction.created_at == position.created, Prediction.id < position.last_id)))
        else:
            page = page.offset(offset)
        page = page.limit(limit + 1)  # one extra row says whether there is a next page
        with self.db.session() as session:
            rows = list(session.scalars(page))
            total = session.scalar(count_query) or 0
        next_cursor = encode_cursor(rows[limit - 1], filters, limit) if len(rows) > limit else None
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
        if since is None:
            try:
                since = until - timedelta(days=30)
            except OverflowError:  # an `until` in the first month of year 1
                since = datetime.min.replace(tzinfo=timezone.utc)
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
            "by_media_type": {kind: by_media.get(kind, 0) for kind in MEDIA_TYPES},
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
