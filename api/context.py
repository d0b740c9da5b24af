"""The composition root: every per-process service object, typed, built here and only here.

create_app calls `build_services` once; routes and hooks reach the result with `services()`.
Blueprints and init_app hooks read these fields, they never add to them. A new service is a new
field here, built in `build_services` from the settings and the services it needs.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import current_app
from flask_limiter import Limiter

from api.config import Settings
from api.database import Database
from api.detector import DetectorConfig, InferenceEngine
from api.detector.interface import Engine
from api.detector.remote_engine import RemoteConfig, RemoteEngine
from api.limits import build_limiter
from api.services.callbacks import CallbackSender
from api.services.jobs import JobStore
from api.services.keys import KeyService
from api.services.predictions import PredictionService
from api.services.queries import QueryService
from api.services.videos import VideoService
from api.storage import ObjectStore, make_object_store
from api.tasks import JobRunner, ThreadExecutor

if TYPE_CHECKING:
    from api.worker import CeleryExecutor


@dataclass
class Services:
    settings: Settings
    db: Database
    store: ObjectStore
    engine: Engine  # in-process or the remote tier: build_engine decides
    predictions: PredictionService
    queries: QueryService
    keys: KeyService
    jobs: JobStore  # video job state (api/services/jobs.py): the only writer of job rows
    videos: VideoService
    callbacks: CallbackSender
    job_runner: JobRunner  # runs one claimed job, the same code under every executor (api/tasks.py)
    video_jobs: ThreadExecutor | CeleryExecutor  # the executor: threads here, or the Celery tier (api/worker.py)
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
    jobs = JobStore(db, store, settings.bucket_videos, settings.job_max_attempts, settings.job_stale_after_s)
    videos = VideoService(db, store, engine, settings, jobs)
    callbacks = CallbackSender(jobs, videos.final_body, settings.callback_allow_http, settings.callback_allow_private)
    runner = JobRunner(jobs, videos, callbacks, settings.job_heartbeat_s)
    if settings.uses_celery:
        from api.worker import CeleryExecutor  # imports Celery only where it is used

        video_jobs: ThreadExecutor | CeleryExecutor = CeleryExecutor(settings)
    else:
        video_jobs = ThreadExecutor(runner, settings.video_workers)
    videos.queue = video_jobs  # the service hands committed jobs to the executor, which runs them through it
    return Services(settings=settings, db=db, store=store, engine=engine,
                    predictions=PredictionService(db, store, engine, settings), queries=QueryService(db),
                    keys=KeyService(db), jobs=jobs, videos=videos, callbacks=callbacks, job_runner=runner,
                    video_jobs=video_jobs, limiter=build_limiter(settings))


def build_engine(settings: Settings) -> Engine:
    """The model in this process, or the shared inference tier when D3_INFERENCE_URL is set."""
    if settings.d3_inference_url:
        return RemoteEngine(RemoteConfig.from_settings(settings))
    return InferenceEngine(DetectorConfig.from_settings(settings))


def services() -> Services:
    return current_app.extensions["d3"]
