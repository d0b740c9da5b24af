"""The composition root: every per-process service object, typed, built here and only here.

create_app calls `build_services` once; routes and hooks reach the result with `services()`.
Blueprints and init_app hooks read these fields, they never add to them. A new service is a new
field here, built in `build_services` from the settings and the services it needs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from flask import current_app
from flask_limiter import Limiter

from api.config import Settings
from api.database import Database
from api.detector import DetectorConfig, InferenceEngine
from api.detector.interface import Engine
from api.detector.remote_engine import RemoteConfig, RemoteEngine
from api.limits import build_limiter
from api.services.keys import KeyService
from api.services.predictions import PredictionService
from api.services.queries import QueryService
from api.services.videos import VideoService
from api.storage import ObjectStore, make_object_store
from api.tasks import VideoJobs


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ObjectStore
    engine: Engine  # in-process or the remote tier: build_engine decides
    predictions: PredictionService
    queries: QueryService
    keys: KeyService
    videos: VideoService
    video_jobs: VideoJobs  # background video jobs (api/tasks.py); recovery starts in create_app
    limiter: Limiter


def build_services(settings: Settings, engine: Engine | None = None) -> Services:
    db = Database(settings.resolved_database_url)
    db.require_migrated()
    # Without a configured secret, links signed by one process are valid only in that process.
    signing_key = (settings.secret_key.get_secret_value() or secrets.token_hex(32)).encode()
    store = make_object_store(settings, signing_key)
    store.ensure_buckets()
    if engine is None:
        engine = build_engine(settings)
        engine.start()  # loads (or connects) in the background; /health says when it is ready
    videos = VideoService(db, store, engine, settings)
    video_jobs = VideoJobs(videos, settings.video_workers)
    videos.on_job_queued = video_jobs.notify
    return Services(settings=settings, db=db, store=store, engine=engine,
                    predictions=PredictionService(db, store, engine, settings), queries=QueryService(db),
                    keys=KeyService(db), videos=videos, video_jobs=video_jobs, limiter=build_limiter(settings))


def build_engine(settings: Settings) -> Engine:
    """The model in this process, or the shared inference tier when D3_INFERENCE_URL is set."""
    if settings.d3_inference_url:
        return RemoteEngine(RemoteConfig.from_settings(settings))
    return InferenceEngine(DetectorConfig.from_settings(settings))


def services() -> Services:
    return current_app.extensions["d3"]
