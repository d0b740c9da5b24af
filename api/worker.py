"""The video worker tier: Celery on Redis. The API publishes job ids; `d3 worker` processes run them.

A message carries only the job id: the job's state lives in the database (api/services/jobs.py),
its upload in the object store. So a message may be delivered twice without harm: the claim
decides who runs it, and a message for a job that has ended is acknowledged and dropped.

- Late acknowledgement: a message is acknowledged when its task returns, so a worker killed mid-job
  (`kill -9`, OOM) leaves it unacknowledged and Redis hands it out again after the visibility
  timeout (CELERY_VISIBILITY_TIMEOUT_S); with reject-on-worker-lost, a prefork pool child that dies
  sends its message back at once. The next worker finds the job still `running` under a dead or
  silent worker, takes it over (one more attempt), and runs it.
- A message for a job that another live worker is running comes back later (Celery retry), so
  the job is never left without a message while it is unfinished.
- Attempts are counted in the database, not by Celery: after JOB_MAX_ATTEMPTS the job is failed
  with the reason of its last attempt.
- Each worker also re-queues, at start-up and every minute, jobs whose worker vanished without
  Redis knowing (say Redis itself restarted), and republishes them.

The pool is `threads` with VIDEO_WORKERS threads: decoding runs in child processes and the frames
go through the process's one inference engine (its batching thread, or the remote inference tier),
so threads share one model instead of loading one per pool process.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from api.config import Settings
from api.exceptions import QueueUnavailable, Unavailable
from api.services.jobs import ClaimOutcome, worker_token

if TYPE_CHECKING:
    from api.tasks import JobRunner

log = logging.getLogger(__name__)

TASK_NAME = "d3.run_video_job"
QUEUE = "d3-video"
REAP_EVERY_S = 60.0
PUBLISH_TIMEOUT_S = 3.0
REQUEUE_COUNTDOWN_S = 2.0


def make_celery(settings: Settings) -> Celery:
    """The Celery app of both sides (the API publishes, `d3 worker` consumes), from the same settings."""
    if not settings.broker_url:
        raise ValueError("no broker: set CELERY_BROKER_URL or REDIS_URL")
    visibility = settings.celery_visibility_timeout_s
    celery = Celery("d3", broker=settings.broker_url, set_as_current=False)
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,  # a worker takes one more job only when it has a free thread
        task_default_queue=QUEUE,
        task_ignore_result=True,  # results live in the database
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=PUBLISH_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility,
            # Sweep for unacknowledged messages often enough for the visibility timeout to mean what it says.
            "unacked_restore_interval": max(1, min(60, int(visibility / 10))),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": PUBLISH_TIMEOUT_S,
            "socket_timeout": max(PUBLISH_TIMEOUT_S, 10.0),
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        broker_heartbeat=0,
    )
    return celery


class CeleryExecutor:
    """The API's side: publish a committed job's id; a broker that cannot take it -> QueueUnavailable (503)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)

    def submit(self, job_id: uuid.UUID) -> None:
        self.publish([job_id])

    def publish(self, job_ids: Sequence[uuid.UUID], countdown: float | None = None) -> None:
        try:
            with self.celery.producer_or_acquire() as producer:
                for job_id in job_ids:
                    self.celery.send_task(TASK_NAME, args=[str(job_id)], queue=QUEUE, countdown=countdown,
                                          retry=False, producer=producer)
        except (OperationalError, KombuError, OSError) as exc:
            log.warning("video job queue unavailable: %s: %s", type(exc).__name__, exc)
            raise QueueUnavailable() from None

    def start(self) -> None:
        """Nothing to do in the API: the workers recover interrupted jobs."""

    def stop(self) -> None:
        self.celery.close()


def register_task(executor: CeleryExecutor, runner: JobRunner, token: str) -> None:
    """The task `d3 worker` runs: claim the job, run it, or come back later."""
    from api.tasks import RunResult

    settings = executor.settings
    jobs = runner.jobs
    busy_countdown = max(1.0, settings.job_stale_after_s / 2)

    @executor.celery.task(name=TASK_NAME, bind=True, max_retries=None, acks_late=True, reject_on_worker_lost=True)
    def run_video_job(task, job_id: str) -> str:
        try:
            job = uuid.UUID(job_id)
        except ValueError:
            log.error("video job message with a bad id %r dropped", job_id)
            return "bad id"
        if not runner.videos.engine.wait_ready(settings.d3_infer_timeout_s):
            raise task.retry(countdown=REQUEUE_COUNTDOWN_S)
        try:
            claim = jobs.claim(job, token)
            if claim.outcome is ClaimOutcome.ENDED:
                video = claim.row.video if claim.row is not None else None
                if video is not None and video.callback_url and video.callback_status == "pending":
                    runner.callbacks.send(job)  # failed just now (out of attempts): say so
                return "ended"
            if claim.outcome is ClaimOutcome.BUSY:  # a live worker has it: look again when it could be lost
                raise task.retry(countdown=busy_countdown)
            result = runner.run(claim.row, token)
        except Unavailable as exc:  # the database is down: the claim (if any) goes stale and is recovered
            log.warning("video job %s: %s; trying again later", job_id, exc.message)
            raise task.retry(countdown=busy_countdown) from None
        if result is RunResult.REQUEUED:
            raise task.retry(countdown=REQUEUE_COUNTDOWN_S * (claim.row.video.attempts or 1))
        return result.value


def _reaper(executor: CeleryExecutor, runner: JobRunner, token: str, stop: threading.Event) -> None:
    """At start-up, republish every queued job (the broker may have lost them); then every minute,
    re-queue and republish jobs whose worker vanished, and send callbacks that are due."""
    first = True
    while True:
        try:
            recovery = runner.jobs.recover(token)
            due = recovery.queued if first else recovery.requeued
            if due:
                executor.publish(due)
            for job_id in recovery.callbacks_due:
                runner.callbacks.send(job_id)
            if recovery.requeued or recovery.failed:
                log.info("video job recovery: %d re-queued, %d failed", len(recovery.requeued),
                         len(recovery.failed))
            first = False
        except Exception as exc:  # the database or the broker may be down: try again next round
            log.warning("video job recovery skipped: %s: %s", type(exc).__name__, exc)
        if stop.wait(REAP_EVERY_S):
            return


def run_worker(executor: CeleryExecutor, runner: JobRunner, argv: Sequence[str] = ()) -> None:
    """`d3 worker`: the Celery worker (threads pool, the d3-video queue), plus the recovery thread."""
    token = worker_token()
    register_task(executor, runner, token)
    stop = threading.Event()
    reaper = threading.Thread(target=_reaper, args=(executor, runner, token, stop), daemon=True,
                              name="d3-video-reaper")
    reaper.start()
    settings = executor.settings
    try:
        executor.celery.worker_main(["worker", "--queues", QUEUE, "--pool", "threads",
                                     "--concurrency", str(settings.video_workers),
                                     "--hostname", f"d3-video@{socket.gethostname()}",
                                     "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
                                     *argv])
    finally:
        stop.set()
