"""The per-process service objects, built once by create_app and reached by routes via `services()`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from api.config import Settings
from api.database import Database
from api.detector import DetectorConfig, InferenceEngine
from api.health_probe import HealthProber, database_check, store_check
from api.services.predictions import PredictionService
from api.services.queries import QueryService
from api.services.reconcile import BackgroundReconciler
from api.storage import ObjectStore, make_object_store


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ObjectStore
    engine: InferenceEngine
    predictions: PredictionService
    queries: QueryService
    prober: HealthProber
    reconciler: BackgroundReconciler
    extra: dict[str, Any] = field(default_factory=dict)  # later concerns (video jobs, ...) attach here


def build_services(settings: Settings, engine: InferenceEngine | None = None) -> Services:
    db = Database(settings.resolved_database_url, settings.db_timeout_s, fail_max=settings.breaker_fail_max,
                  max_in_flight=settings.resolved_max_in_flight)
    db.require_migrated()
    # Without a configured secret, links signed by one process are valid only in that process.
    signing_key = (settings.secret_key or secrets.token_hex(32)).encode()
    store = make_object_store(settings, signing_key)
    store.ensure_buckets()
    if engine is None:
        engine = InferenceEngine(DetectorConfig.from_settings(settings))
        engine.start()  # loads in the background; /health says when it is ready
    return Services(settings=settings, db=db, store=store, engine=engine,
                    predictions=PredictionService(db, store, engine, settings), queries=QueryService(db),
                    prober=build_prober(settings, db, store),
                    reconciler=BackgroundReconciler(db, store, settings))


def build_prober(settings: Settings, db: Database, store: ObjectStore) -> HealthProber:
    """Checks for the database and the store; later concerns (Redis, an inference tier) add theirs."""
    prober = HealthProber(settings.probe_interval_s, settings.probe_timeout_s)
    prober.add("database", database_check(db, settings.probe_timeout_s), guard=db.guard)
    prober.add("object_store", store_check(store), guard=store.guard, on_ok=store.pending_deletes.retry)
    return prober


def services() -> Services:
    return current_app.extensions["d3"]
