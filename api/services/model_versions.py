"""Model versions: the heads the service can serve, their model cards, and which one is active.

A version is a head checkpoint (the authors' plain state_dict) and, optionally, its model card
(`d3 train` / `d3 calibrate`, format d3-model-card/1), both kept in the models bucket, plus a row in
`model_versions`. Its id is the head's identity in every model_version string, `sha256:<12 hex>`,
so it is stable and the same head added twice is the same version. The `active_model` row names the
version that answers (none: the configured D3_HEAD_WEIGHTS head); every process that serves the
model polls that row (api/detector/versions.py) and switches without a restart.

Objects are written before the row (api/services/records.py): a version whose row exists always
has its head in the store. This module is also the `HeadCatalog` the engines poll.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.config import Settings
from api.database import Database
from api.exceptions import InvalidInput, NotFound
from api.models import ActiveModel, ModelVersion, iso
from api.services.records import insert_with_objects, put_objects
from api.storage import ObjectNotFound, ObjectStore

SLOT = "d3"
CARD_FORMAT = "d3-model-card/1"  # api/detector/training.py writes it; not imported: that module loads torch
MAX_HEAD_BYTES = 64 * 1024 * 1024  # the released head is 12.6 MB
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX = re.compile(r"^[0-9a-f]{6,64}$")


CARD_SECTIONS = ("validation", "calibration")  # the objects a listing reads fields from


def version_id(sha256: str) -> str:
    return f"sha256:{sha256[:12]}"


def card_summary(card: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a listing shows of a card: when, the threshold, validation before/after, calibration target."""
    if not card:
        return None
    # A card stored before its sections were checked may hold anything: show what fits, never fail.
    validation = card.get("validation") if isinstance(card.get("validation"), dict) else {}
    calibration = card.get("calibration") if isinstance(card.get("calibration"), dict) else None
    return {"created_at": card.get("created_at"), "threshold": card.get("threshold"),
            "validation": validation.get("trained"), "validation_start": validation.get("start"),
            "calibration": {k: calibration.get(k) for k in ("target", "max_fpr", "ap")} if calibration else None,
            "belongs_to": card.get("belongs_to"), "epochs_run": card.get("epochs_run"), "seed": card.get("seed")}



def check_card(card: Any, sha256: str) -> float | None:
    """A card is a d3-model-card/1 object about this head; its threshold (if any) a probability."""
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise InvalidInput(f"the card is not a {CARD_FORMAT} model card (made by `d3 train`)", parameter="card")
    for section in CARD_SECTIONS:
        if card.get(section) is not None and not isinstance(card[section], dict):
            raise InvalidInput(f"the card's {section!r} must be an object, got {type(card[section]).__name__}",
                               parameter="card")
    claimed = card.get("head_sha256")
    if claimed and claimed != sha256:
        raise InvalidInput(f"the card belongs to head {str(claimed)[:12]}, not to this head ({sha256[:12]})",
                           parameter="card")
    threshold = card.get("threshold")
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0.0 <= threshold <= 1.0:
        raise InvalidInput(f"the card's threshold must be a number from 0 to 1, got {threshold!r}", parameter="card")
    return float(threshold)


def parse_card(data: bytes) -> dict[str, Any]:
    try:
        card = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the card is not JSON: {exc}", parameter="card") from None
    except RecursionError:  # nested deeper than the parser's stack
        raise InvalidInput("the card is not a model card: nested too deeply", parameter="card") from None
    if not isinstance(card, dict):
        raise InvalidInput("the card is not a JSON object", parameter="card")
    return card


class ModelVersions:
    def __init__(self, db: Database, store: ObjectStore, settings: Settings,
                 check_head: Callable[[bytes, str], None] | None = None) -> None:
        self.db = db
        self.store = store
        self.bucket = settings.bucket_models
        self.backbone = settings.d3_backbone
        self.default_threshold = settings.default_threshold
        # check_head(data, label) raises on a head that does not fit the configured backbone; the
        # default builds the spec's head layout for it (imports torch, so only when first needed).
        self._check_head = check_head

    # ------------------------------------------------------------ reading
    def list(self) -> list[dict[str, Any]]:
        with self.db.session() as session:
            rows = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc())).all()
            active = self._active_row(session)
        active_id = active.version_id if active else None
        return [self.public(row, row.id == active_id) for row in rows]

    def public(self, row: ModelVersion, active: bool) -> dict[str, Any]:
        return {"version": row.id, "name": row.name, "sha256": row.sha256, "size_bytes": row.size_bytes,
                "created_at": iso(row.created_at), "active": active, "threshold": row.threshold,
                "card": card_summary(row.card)}

    def resolve(self, ref: str) -> ModelVersion:
        """A version by id (sha256:<12 hex>), name, or a unique prefix of its sha256 (at least 6 hex)."""
        ref = (ref or "").strip()
        if not ref:
            raise InvalidInput("name a model version (its id, name or sha256)", parameter="version")
        with self.db.session() as session:
            row = session.get(ModelVersion, ref) or session.scalars(
                select(ModelVersion).where(ModelVersion.name == ref)).first()
            if row is None:
                digits = ref.removeprefix("sha256:").lower()
                if _HEX.match(digits):
                    matches = session.scalars(select(ModelVersion).where(
                        ModelVersion.sha256.startswith(digits))).all()
                    if len(matches) > 1:
                        raise InvalidInput(f"{ref!r} matches {len(matches)} versions; give more of the hash",
                                           parameter="version")
                    row = matches[0] if matches else None
        if row is None:
            raise NotFound(f"no model version {ref!r} (see GET /models or `d3 models list`)")
        return row

    def active_record(self) -> dict[str, Any]:
        """The database's view: which version is active, since when, set by whom."""
        with self.db.session() as session:
            active = self._active_row(session)
            row = session.get(ModelVersion, active.version_id) if active and active.version_id else None
            return {"version": row.id if row else None, "name": row.name if row else None,
                    "threshold": row.threshold if row else None,
                    "activated_at": iso(active.activated_at) if active else None,
                    "activated_by": active.activated_by if active else None}

    def active_view(self, engine: Any) -> dict[str, Any]:
        """What answers a request sent now in `engine`'s process: the head it would pin, its default
        threshold (the card's, else DEFAULT_THRESHOLD), when the process last polled, and the database's view."""
        head = engine.head()
        from_card = head.threshold is not None
        return {"version": head.version, "model_version": head.model_version, "trained": head.trained,
                "threshold": head.threshold if from_card else self.default_threshold,
                "threshold_source": "card" if from_card else "settings",
                "source": "configured" if head.version is None else "model_versions",
                "poll": _poll_state(engine), "database": self.active_record()}

    # ------------------------------------------------------------ HeadCatalog (polled by the engines)
    def active_version(self) -> str | None:
        with self.db.session() as session:
            return session.scalar(select(ActiveModel.version_id).where(ActiveModel.slot == SLOT))

    def version_threshold(self, version: str) -> float | None:
        with self.db.session() as session:
            return session.scalar(select(ModelVersion.threshold).where(ModelVersion.id == version))

    def head_files(self, version: str) -> tuple[bytes, float | None]:
        with self.db.session() as session:
            row = session.get(ModelVersion, version)
        if row is None:
            raise NotFound(f"no model version {version!r}")
        try:
            return self.store.get_bytes(self.bucket, row.head_object), row.threshold
        except ObjectNotFound:
            raise NotFound(f"the head of model version {version} is missing from the store") from None

    # ------------------------------------------------------------ changes
    def add(self, data: bytes, card: dict[str, Any] | None = None, name: str | None = None
            ) -> tuple[dict[str, Any], bool]:
        """Store a head (and its card) as a version; (its public view, whether it is new).

        The head must fit the configured backbone (the spec's keys and shapes); a bad head, card or
        name is refused before anything is stored. The same head again updates its card or name.
        """
        if not data:
            raise InvalidInput("the head file is empty", parameter="head")
        if len(data) > MAX_HEAD_BYTES:
            raise InvalidInput(f"the head file is {len(data)} bytes, over the limit of {MAX_HEAD_BYTES}",
                               parameter="head")
        name = self._check_name(name)
        sha256 = hashlib.sha256(data).hexdigest()
        vid = version_id(sha256)
        threshold = check_card(card, sha256) if card is not None else None
        self._validate_head(data, vid)
        card_bytes = json.dumps(card, indent=2).encode() if card is not None else None
        with self.db.session() as session:
            existing = session.get(ModelVersion, vid)
            if name is not None:
                holder = session.scalars(select(ModelVersion).where(ModelVersion.name == name)).first()
                if holder is not None and holder.id != vid:
                    raise InvalidInput(f"the name {name!r} is taken by version {holder.id}", parameter="name")
        head_object = f"heads/{sha256}.pth"
        if existing is None:
            row = ModelVersion(id=vid, name=name, sha256=sha256, size_bytes=len(data),
                               head_object=head_object, card=card, threshold=threshold,
                               card_object=f"cards/{sha256}.card.json" if card_bytes else None,
                               created_at=datetime.now(timezone.utc))
            objects: list = [(self.bucket, row.head_object, data, "application/octet-stream")]
            if card_bytes is not None:
                objects.append((self.bucket, row.card_object, card_bytes, "application/json"))
            try:
                insert_with_objects(self.db, self.store, row, objects, content_addressed=True)
                return self.public(row, False), True
            except IntegrityError:
                # Another request stored this head (or took the name) meanwhile: carry on as a re-add.
                # The objects are named by their bytes, so they are the other row's and stay.
                pass
        else:
            objects = [(self.bucket, head_object, data, "application/octet-stream")]
            if card_bytes is not None:
                objects.append((self.bucket, f"cards/{sha256}.card.json", card_bytes, "application/json"))
            # Same keys, same bytes: writing them again repairs a version whose head went missing.
            put_objects(self.store, objects)
        try:
            with self.db.session() as session:
                row = session.get(ModelVersion, vid)
                if row is None:  # the insert lost to another head taking the same name
                    raise InvalidInput(f"the name {name!r} was just taken by another version", parameter="name")
                if card is not None:
                    row.card, row.threshold, row.card_object = card, threshold, f"cards/{sha256}.card.json"
                if name is not None:
                    row.name = name
                active = self._active_row(session)
        except IntegrityError:  # another version took the name between the check and the commit
            raise InvalidInput(f"the name {name!r} was just taken by another version", parameter="name") from None
        return self.public(row, bool(active and active.version_id == vid)), False

    def activate(self, ref: str | None, by: str | None = None, engine: Any = None) -> dict[str, Any]:
        """Make a version the one that answers (None: back to the configured head). `engine`'s process
        switches now, every other serving process at its next poll; a request already running keeps
        the head it pinned."""
        row = self.resolve(ref) if ref is not None else None
        if row is not None and not self.store.exists(self.bucket, row.head_object):
            raise NotFound(f"the head of model version {row.id} is missing from the store; add it again")
        with self.db.session() as session:
            active = self._active_row(session)
            if active is None:  # the migration creates it; a database restored without it gets it back
                active = ActiveModel(slot=SLOT)
                session.add(active)
            active.version_id = row.id if row else None
            active.activated_at = datetime.now(timezone.utc)
            active.activated_by = by
        sync = getattr(engine, "sync_versions", None)  # engines without model versions have none
        if sync is not None:
            sync()
        return self.active_record()

    # ------------------------------------------------------------ internals
    @staticmethod
    def _active_row(session) -> ActiveModel | None:
        return session.get(ActiveModel, SLOT)

    @staticmethod
    def _check_name(name: str | None) -> str | None:
        if name is None or not name.strip():
            return None
        name = name.strip()
        if not _NAME.match(name) or name.lower() in ("default", "configured", "none") or _HEX.match(name.lower()):
            raise InvalidInput("a name is 1-128 letters, digits, '.', '_' or '-', starts with a letter or digit, "
                               "is not all hex digits and is not 'default', 'configured' or 'none'",
                               parameter="name")
        return name

    def _validate_head(self, data: bytes, vid: str) -> None:
        if self._check_head is None:
            from api.detector.errors import WeightsError
            from api.detector.weights import head_dim, head_state_from_bytes

            dim = head_dim(self.backbone)

            def check(blob: bytes, label: str) -> None:
                try:
                    head_state_from_bytes(blob, dim, label)
                except WeightsError as exc:
                    raise InvalidInput(f"{exc} (backbone {self.backbone})", parameter="head") from None

            self._check_head = check
        self._check_head(data, f"the uploaded head ({vid})")


def _poll_state(engine: Any) -> dict[str, Any] | None:
    # When this process last read the active version, and why it could not (a database it cannot reach).
    versions = getattr(engine, "versions", None)
    state = versions() if versions is not None else None
    return {k: state.get(k) for k in ("poll_s", "polled_at", "poll_error")} if state else None


def catalog_from_settings(settings: Settings) -> tuple[ModelVersions | None, str]:
    """The catalog for a process beside the API (the inference tier): the API's database and store,
    when that database exists and is migrated; else None and why (the process serves D3_HEAD_WEIGHTS).
    Nothing is created here: a tier without a database of its own must not make an empty one."""
    from sqlalchemy.engine import make_url

    from api.database import SchemaNotMigrated
    from api.exceptions import DatabaseUnavailable
    from api.storage import make_object_store

    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).is_file()):
        return None, f"no database at {url.database}"
    db = Database(settings.resolved_database_url, settings.db_timeout_s)
    try:
        db.require_migrated()
    except (DatabaseUnavailable, SchemaNotMigrated) as exc:
        db.dispose()
        return None, str(exc)
    return ModelVersions(db, make_object_store(settings, b"unused: no links are signed here"), settings), ""
