"""Reconcile the object store with the database: no object without a row, and say which rows lost theirs.

Records are written objects first, then the row (api/services/records.py), and a failed row
removes its objects at once when it can. What slips through (the store was frozen when the
delete was due, a put that timed out landed later, the process died between object and row)
is found here: every object in the buckets that no row references and that is older than the
grace period is deleted. The grace period covers records whose row is still on its way.

Rows whose object is missing are only reported: the row is the record of what was answered,
and removing it would hide the loss.

Runs in the background of every API process (RECONCILE_INTERVAL_S; each run is idempotent, so
several processes may run it) and as `d3 store reconcile`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from api.config import Settings
from api.database import Database
from api.models import ModelVersion, Prediction, VideoPrediction
from api.services.series import TIMELINE_SUFFIX, timeline_key_for
from api.storage import ObjectStore, media_bucket

log = logging.getLogger(__name__)

# The media types whose results have a timeline picture beside the summary (series.timeline_key).
SERIES_MEDIA = ("video", "audio")
SAMPLE = 20  # how many keys/ids a report lists


@dataclass
class ReconcileReport:
    objects_seen: int = 0
    removed: list[str] = field(default_factory=list)  # bucket/key
    kept_young: int = 0  # unreferenced but within the grace period
    rows_without_object: list[str] = field(default_factory=list)  # "<id> bucket/key"
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"objects_seen": self.objects_seen, "removed": len(self.removed),
                "removed_sample": self.removed[:SAMPLE], "kept_young": self.kept_young,
                "rows_without_object": len(self.rows_without_object),
                "rows_without_object_sample": self.rows_without_object[:SAMPLE], "dry_run": self.dry_run}


def referenced_objects(db: Database, settings: Settings) -> dict[tuple[str, str], str]:
    """Every (bucket, key) a row points at -> the row's id."""
    refs: dict[tuple[str, str], str] = {}
    with db.session() as session:
        rows = session.execute(select(Prediction.id, Prediction.media_type, Prediction.status,
                                      Prediction.result_object, Prediction.media_object))
        for prediction_id, media_type, _status, result_object, media_object in rows:
            if result_object:
                refs[(settings.bucket_results, result_object)] = str(prediction_id)
                if media_type in SERIES_MEDIA:
                    refs[(settings.bucket_results, timeline_key_for(result_object))] = str(prediction_id)
            if media_object:
                refs[(media_bucket(settings, media_type), media_object)] = str(prediction_id)
        videos = session.execute(select(VideoPrediction.prediction_id, VideoPrediction.frames_object,
                                        VideoPrediction.upload_object))
        for prediction_id, frames_object, upload_object in videos:
            if frames_object:
                refs[(settings.bucket_frames, frames_object)] = str(prediction_id)
            if upload_object:
                refs[(settings.bucket_videos, upload_object)] = str(prediction_id)
        # Model versions' heads and cards (api/services/model_versions.py) are referenced by their rows.
        versions = session.execute(select(ModelVersion.id, ModelVersion.head_object, ModelVersion.card_object))
        for version_id, head_object, card_object in versions:
            for key in (head_object, card_object):
                if key:
                    refs[(settings.bucket_models, key)] = version_id
    return refs


def reconcile(db: Database, store: ObjectStore, settings: Settings, grace_s: float,
              dry_run: bool = False) -> ReconcileReport:
    """Delete unreferenced objects older than `grace_s`; report rows whose object is gone.

    The objects are listed before the rows are read, so an object written after the listing
    began is never a candidate, and one whose row lands meanwhile is seen as referenced.
    """
    report = ReconcileReport(dry_run=dry_run)
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=grace_s)
    listed: dict[tuple[str, str], datetime] = {}
    for bucket in store.buckets:
        for key, modified in store.list_objects(bucket):
            listed[(bucket, key)] = modified
    report.objects_seen = len(listed)
    refs = referenced_objects(db, settings)
    for (bucket, key), modified in sorted(listed.items()):
        if (bucket, key) in refs:
            continue
        if modified is not None and modified.tzinfo is None:
            modified = modified.replace(tzinfo=timezone.utc)
        if modified is not None and modified > cutoff:
            report.kept_young += 1
            continue
        if not dry_run:
            store.delete(bucket, key)
        report.removed.append(f"{bucket}/{key}")
    listed_keys = set(listed)
    for (bucket, key), prediction_id in sorted(refs.items(), key=lambda item: item[1]):
        if (bucket, key) not in listed_keys and not key.endswith(TIMELINE_SUFFIX):
            report.rows_without_object.append(f"{prediction_id} {bucket}/{key}")
    if report.removed or report.rows_without_object:
        log.warning("store reconcile: %s", report.as_dict())
    return report


class BackgroundReconciler:
    """Runs `reconcile` every `interval_s` (with jitter, so workers do not all run at once)."""

    def __init__(self, db: Database, store: ObjectStore, settings: Settings) -> None:
        self.db, self.store, self.settings = db, store, settings
        self.last: ReconcileReport | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self.settings.reconcile_interval_s > 0:
            threading.Thread(target=_loop, args=(weakref.ref(self), self._stop, self.settings.reconcile_interval_s),
                             name="d3-reconcile", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def run_once(self) -> ReconcileReport | None:
        try:
            self.last = reconcile(self.db, self.store, self.settings, self.settings.reconcile_grace_s)
        except Exception as exc:  # noqa: BLE001 - a failing store or database: try again next time
            log.warning("store reconcile skipped: %s", exc)
            return None
        return self.last


def _loop(ref: weakref.ref[BackgroundReconciler], stop: threading.Event, interval_s: float) -> None:
    # Held weakly: a process (or test) that drops its services ends this thread too.
    while not stop.wait(interval_s * random.uniform(0.8, 1.2)):  # noqa: S311 - jitter, not security
        reconciler = ref()
        if reconciler is None:
            return
        started = time.monotonic()
        reconciler.run_once()
        log.debug("store reconcile took %.1f s", time.monotonic() - started)
        del reconciler
