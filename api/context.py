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
from api.detector.registry import DetectorRegistry
from api.detector.remote_engine import RemoteConfig, RemoteEngine
from api.health_probe import HealthProber, database_check, inference_tier_check, redis_check, store_check
from api.limits import build_limiter
from api.services.audio import AudioService
from api.services.callbacks import CallbackSender
from api.services.jobs import JobStore
from api.services.keys import KeyService
from api.services.model_versions import ModelVersions
from api.services.predictions import PredictionService
from api.services.queries import QueryService
from api.services.reconcile import BackgroundReconciler
from api.services.texts import TextService
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
    job_runner: JobRunner  # runs one claimed job (video or audio), the same code under every executor (api/tasks.py)
    video_jobs: ThreadExecutor | CeleryExecutor  # the executor: threads here, or the Celery tier (api/worker.py)
    limiter: Limiter
    detectors: DetectorRegistry  # speech (AASIST) and text (Fast-DetectGPT), each loading on its own
    audio: AudioService
    texts: TextService
    prober: HealthProber  # /health's verdicts; opens and closes each outside system's breaker
    reconciler: BackgroundReconciler  # objects no row references (api/services/reconcile.py)
    model_versions: ModelVersions  # the heads the engine can switch between, and which one is active


def build_services(settings: Settings, engine: Engine | None = None,
                   detectors: DetectorRegistry | None = None) -> Services:
    db = Database(settings.resolved_database_url, settings.db_timeout_s, fail_max=settings.breaker_fail_max,
                  max_in_flight=settings.resolved_max_in_flight)
    db.require_migrated()
    # Without a configured secret, links signed by one process are valid only in that process.
    signing_key = (settings.secret_key.get_secret_value() or secrets.token_hex(32)).encode()
    store = make_object_store(settings, signing_key)
    store.ensure_buckets()
    model_versions = ModelVersions(db, store, settings)
    if engine is None:
        engine = build_engine(settings)
        # Every process serving the model follows the active version (a shared engine passed in
        # by a test or benchmark keeps whatever it was given).
        engine.attach_versions(model_versions, settings.model_version_poll_s)
        engine.start()  # loads (or connects) in the background; /health says when it is ready
    prober = build_prober(settings, db, store, engine)
    jobs = JobStore(db, store, settings.bucket_videos, settings.job_max_attempts, settings.job_stale_after_s)
    videos = VideoService(db, store, engine, settings, jobs)
    callbacks = CallbackSender(jobs, videos.final_body, settings.callback_allow_http, settings.callback_allow_private)
    callbacks.timeout_s = settings.callback_timeout_s
    runner = JobRunner(jobs, videos, callbacks, settings.job_heartbeat_s)
    if settings.uses_celery:
        from api.worker import CeleryExecutor  # imports Celery only where it is used

        video_jobs: ThreadExecutor | CeleryExecutor = CeleryExecutor(settings)
    else:
        video_jobs = ThreadExecutor(runner, settings.video_workers)
    videos.queue = video_jobs  # the service hands committed jobs to the executor, which runs them through it
    if detectors is None:
        detectors = DetectorRegistry.from_settings(settings)
        detectors.start()  # each modality loads in the background; /health says which is ready
    audio = AudioService(db, store, detectors, settings, jobs)
    audio.queue = video_jobs  # speech jobs ride on the same queue and rows
    runner.audio = audio
    return Services(settings=settings, db=db, store=store, engine=engine,
                    predictions=PredictionService(db, store, engine, settings), queries=QueryService(db),
                    keys=KeyService(db), jobs=jobs, videos=videos, callbacks=callbacks, job_runner=runner,
                    video_jobs=video_jobs, limiter=build_limiter(settings, prober), detectors=detectors, audio=audio,
                    texts=TextService(db, store, detectors, settings), prober=prober,
                    reconciler=BackgroundReconciler(db, store, settings), model_versions=model_versions)


def build_engine(settings: Settings) -> Engine:
    """The model in this process, or the shared inference tier when D3_INFERENCE_URL is set."""
    if settings.d3_inference_url:
        return RemoteEngine(RemoteConfig.from_settings(settings))
    return InferenceEngine(DetectorConfig.from_settings(settings))


def build_prober(settings: Settings, db: Database, store: ObjectStore, engine: Engine | None = None) -> HealthProber:
    """Checks for the database, the store, a remote inference tier and a Celery broker that is not
    the limiter's Redis (build_limiter adds the check of REDIS_URL)."""
    timeout = settings.probe_timeout_s
    prober = HealthProber(settings.probe_interval_s, timeout)
    prober.add("database", database_check(db, timeout), guard=db.guard)
    prober.add("object_store", store_check(store), guard=store.guard, on_ok=store.pending_deletes.retry)
    if isinstance(engine, RemoteEngine):
        prober.add("inference_tier", inference_tier_check(engine, timeout))
    if settings.uses_celery and settings.broker_url != settings.redis_url and settings.broker_url.startswith("redis"):
        prober.add("broker", redis_check(settings.broker_url, timeout))
    return prober


def services() -> Services:
    return current_app.extensions["d3"]
