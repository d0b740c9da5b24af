"""The per-process service objects, built once by create_app and reached by routes via `services()`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import current_app

if TYPE_CHECKING:
    from api.worker import CeleryExecutor

from api.config import Settings
from api.database import Database
from api.detector import DetectorConfig, InferenceEngine
from api.services.callbacks import CallbackSender
from api.services.jobs import JobStore
from api.services.predictions import PredictionService
from api.services.queries import QueryService
from api.services.videos import VideoService
from api.storage import ObjectStore, make_object_store
from api.tasks import JobRunner, ThreadExecutor


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ObjectStore
    engine: InferenceEngine
    predictions: PredictionService
    queries: QueryService
    jobs: JobStore
    videos: VideoService
    callbacks: CallbackSender
    job_runner: JobRunner  # runs one claimed job (the same code under every executor)
    video_jobs: ThreadExecutor | CeleryExecutor  # the executor: threads here, or the Celery worker tier
    extra: dict[str, Any] = field(default_factory=dict)  # later concerns attach here


def build_services(settings: Settings, engine: InferenceEngine | None = None) -> Services:
    db = Database(settings.resolved_database_url)
    db.require_migrated()
    # Without a configured secret, links signed by one process are valid only in that process.
    signing_key = (settings.secret_key or secrets.token_hex(32)).encode()
    store = make_object_store(settings, signing_key)
    store.ensure_buckets()
    if engine is None:
        engine = InferenceEngine(DetectorConfig.from_settings(settings))
        engine.start()  # loads in the background; /health says when it is ready
    jobs = JobStore(db, store, settings.bucket_videos, settings.job_max_attempts, settings.job_stale_after_s)
    videos = VideoService(db, store, engine, settings, jobs)
    callbacks = CallbackSender(jobs, videos.final_body, settings.callback_allow_http, settings.callback_allow_private)
    runner = JobRunner(jobs, videos, callbacks, settings.job_heartbeat_s)
    if settings.uses_celery:
        from api.worker import CeleryExecutor

        executor: ThreadExecutor | CeleryExecutor = CeleryExecutor(settings)
    else:
        executor = ThreadExecutor(runner, settings.video_workers)
    videos.queue = executor
    return Services(settings=settings, db=db, store=store, engine=engine,
                    predictions=PredictionService(db, store, engine, settings), queries=QueryService(db),
                    jobs=jobs, videos=videos, callbacks=callbacks, job_runner=runner, video_jobs=executor)


def services() -> Services:
    return current_app.extensions["d3"]
