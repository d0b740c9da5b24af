"""The per-process service objects, built once by create_app and reached by routes via `services()`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from flask import current_app

from api.config import Settings
from api.database import Database
from api.detector import DetectorConfig, InferenceEngine
from api.detector.remote_engine import RemoteConfig, RemoteEngine
from api.services.predictions import PredictionService
from api.services.queries import QueryService
from api.storage import ObjectStore, make_object_store


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ObjectStore
    engine: InferenceEngine | RemoteEngine
    predictions: PredictionService
    queries: QueryService
    extra: dict[str, Any] = field(default_factory=dict)  # later concerns (video jobs, ...) attach here


def build_services(settings: Settings, engine: InferenceEngine | None = None) -> Services:
    db = Database(settings.resolved_database_url)
    db.require_migrated()
    # Without a configured secret, links signed by one process are valid only in that process.
    signing_key = (settings.secret_key or secrets.token_hex(32)).encode()
    store = make_object_store(settings, signing_key)
    store.ensure_buckets()
    if engine is None:
        engine = build_engine(settings)
        engine.start()  # loads (or connects) in the background; /health says when it is ready
    return Services(settings=settings, db=db, store=store, engine=engine,
                    predictions=PredictionService(db, store, engine, settings), queries=QueryService(db))


def build_engine(settings: Settings) -> InferenceEngine | RemoteEngine:
    """The model in this process, or the shared inference tier when D3_INFERENCE_URL is set."""
    if settings.d3_inference_url:
        return RemoteEngine(RemoteConfig.from_settings(settings))
    return InferenceEngine(DetectorConfig.from_settings(settings))


def services() -> Services:
    return current_app.extensions["d3"]
