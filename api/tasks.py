"""Background work for video jobs: running one claimed job (the same code for every executor), and
the in-process executor of the embedded default.

`JobRunner` takes a job the job store (api/services/jobs.py) let a worker claim and runs it to its
end: the upload from the object store, the analysis (VideoService: decoding in a child process,
frames through whatever inference engine the services hold), then done, failed, or back to the
queue; a heartbeat thread says it is alive meanwhile, and a job taken away from this worker is
abandoned at the next progress step. Two executors hand jobs to it:

- `ThreadExecutor` (here): at most VIDEO_WORKERS threads in the API process; they start when work
  arrives and stop when there is none, so an idle process polls nothing. Start-up recovery (and at
  most once a minute when jobs are submitted) re-queues jobs whose worker is gone.
- the Celery worker tier (api/worker.py, `d3 worker`), when a broker is configured.

A decoder that died (crashed, killed at its time or memory limit) may have died of the host's
state rather than the file, so that attempt is retried, up to JOB_MAX_ATTEMPTS in all; a file that
is plainly not a usable video fails at once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING

from api.exceptions import DatabaseUnavailable, ServiceError, Unavailable, UnprocessableMedia
from api.models import Prediction
from api.services.callbacks import CallbackSender
from api.services.jobs import JobStore, worker_token
from api.services.videos import VideoParams, VideoService, temp_prefix
from api.storage import ObjectNotFound, StoreUnavailable

if TYPE_CHECKING:
    from flask import Flask

    from api.services.audio import AudioService

log = logging.getLogger(__name__)

REAP_EVERY_S = 60.0
ENGINE_WAIT_S = 1.0
# Decoder deaths worth another attempt: they can come from the host (memory pressure, load).
RETRYABLE_DECODE_FAILURES = frozenset({"crashed", "memory", "timeout"})


class JobLost(Exception):
    """The claim moved to another worker while this one was running the job."""


class RunResult(enum.Enum):
    ENDED = "ended"  # done or failed
    REQUEUED = "requeued"  # back in the queue for another attempt
    LOST = "lost"  # not this worker's any more


class JobRunner:
    """Runs one claimed job; knows nothing of threads pools or Celery."""

    def __init__(self, jobs: JobStore, videos: VideoService, callbacks: CallbackSender, heartbeat_s: float) -> None:
        self.jobs = jobs
        self.videos = videos
        self.callbacks = callbacks
        self.heartbeat_s = heartbeat_s
        self.audio: AudioService | None = None  # set by build_services: audio jobs share the queue and rows

    def run(self, row: Prediction, worker: str) -> RunResult:
        job_id = row.id
        lost = threading.Event()
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, worker, stop, lost), daemon=True,
                                name="d3-video-beat")
        beat.start()
        try:
            result, ended = self._attempt(row, worker, lost)
        finally:
            stop.set()
            beat.join()
        log.info("video job %s: %s", job_id, ended.status if ended is not None else result.value)
        if result is RunResult.ENDED and ended is not None and ended.video is not None and ended.video.callback_url:
            self.callbacks.send(job_id)
        return result

    def _heartbeat(self, job_id: uuid.UUID, worker: str, stop: threading.Event, lost: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            if not self.jobs.heartbeat(job_id, worker):
                lost.set()
                return

    def _attempt(self, row: Prediction, worker: str, lost: threading.Event) -> tuple[RunResult, Prediction | None]:
        job_id = row.id
        settings = self.videos.settings

        def ended(final: Prediction | None) -> tuple[RunResult, Prediction | None]:
            return (RunResult.ENDED if final is not None else RunResult.LOST), final

        def again(reason: str) -> tuple[RunResult, Prediction | None]:
            final = self.jobs.retry_later(job_id, worker, reason)
            if final is None:
                return RunResult.LOST, None
            return (RunResult.REQUEUED if final.status == "queued" else RunResult.ENDED), final

        def progress(done: int, total: int) -> None:
            if lost.is_set() or not self.jobs.heartbeat(job_id, worker, done, total):
                raise JobLost(str(job_id))

        upload_key = row.video.upload_object
        if not upload_key:
            return ended(self.jobs.fail(job_id, worker, "the uploaded video is no longer stored"))
        fd, path = tempfile.mkstemp(prefix=temp_prefix("job"), suffix=".upload")
        os.close(fd)
        started = time.perf_counter()
        try:
            try:
                self.videos.store.download_file(settings.bucket_videos, upload_key, path)
            except ObjectNotFound:
                return ended(self.jobs.fail(job_id, worker, "the uploaded video is no longer stored"))
            except StoreUnavailable:
                return again("the object store was unavailable")
            if row.media_type == "audio" and self.audio is not None:  # a speech job: the audio service's analysis
                fill = self.audio.job_filler(row, path, progress, started)
                return ended(self.jobs.complete(job_id, worker, fill, keep_upload=False))
            params = VideoParams.from_row(row)
            analysis = self.videos.analyze_file(path, params, progress=progress)
            fill = self.videos.result_filler(analysis, params, (time.perf_counter() - started) * 1000.0)
            return ended(self.jobs.complete(job_id, worker, fill, keep_upload=settings.keep_videos))
        except JobLost:
            log.warning("video job %s was taken over by another worker; this attempt is abandoned", job_id)
            return RunResult.LOST, None
        except UnprocessableMedia as exc:
            if exc.details.get("reason") in RETRYABLE_DECODE_FAILURES:
                return again(exc.message)
            return ended(self.jobs.fail(job_id, worker, exc.message))
        except Unavailable as exc:
            return again(exc.message)
        except ServiceError as exc:
            return ended(self.jobs.fail(job_id, worker, exc.message))
        except Exception:
            log.exception("video job %s failed", job_id)
            return ended(self.jobs.fail(job_id, worker, "internal error while analysing the video; it has been logged"))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class ThreadExecutor:
    """At most `workers` job threads in this process; the job store decides who runs what.

    Not concurrent.futures' pool: a pool owns a queue of its own, and here the queue is the job
    rows (claimed from the database, recovered after a restart): up to `workers` threads are started
    when a job is queued, each claims rows until none is left, then ends.
    """

    def __init__(self, runner: JobRunner, workers: int) -> None:
        self.runner = runner
        self.jobs = runner.jobs
        self.workers = workers
        self.token = worker_token()
        self._lock = threading.Lock()
        self._active = 0
        self._dirty = False
        self._stopped = False
        self._last_reap = time.monotonic()

    # ---------------------------------------------------------------- the JobQueue interface
    def submit(self, job_id: uuid.UUID) -> None:
        self.notify()

    def start(self) -> None:
        """Start-up: recover what a previous process left, then run what is queued."""
        self.recover(startup=True)

    # ---------------------------------------------------------------- lifecycle
    def notify(self) -> None:
        """There may be queued jobs: make sure workers are running (up to the pool size)."""
        if time.monotonic() - self._last_reap > REAP_EVERY_S:
            self._last_reap = time.monotonic()
            self.recover(startup=False)
        with self._lock:
            if self._stopped:
                return
            self._dirty = True
            missing = self.workers - self._active
            self._active += missing
        for _ in range(missing):
            threading.Thread(target=self._loop, name="d3-video-job", daemon=True).start()

    def stop(self) -> None:
        """Let running jobs finish but start no new ones (tests; a stopping process)."""
        with self._lock:
            self._stopped = True

    def _loop(self) -> None:
        db_errors = 0
        try:
            while True:
                with self._lock:
                    self._dirty = False
                    if self._stopped:
                        return
                if not self.runner.videos.engine.ready:
                    # A restart re-queues jobs while the model loads; they wait for it (queued).
                    time.sleep(ENGINE_WAIT_S)
                    with self._lock:
                        self._dirty = True
                    continue
                try:
                    row = self.jobs.claim_next(self.token)
                except DatabaseUnavailable as exc:
                    db_errors += 1
                    log.warning("video jobs: cannot claim a job (%s)", exc)
                    if db_errors >= 3:
                        return
                    time.sleep(2.0 * db_errors)
                    continue
                db_errors = 0
                if row is None:
                    with self._lock:
                        if self._dirty and not self._stopped:
                            continue  # work arrived while we looked
                        return
                self.runner.run(row, self.token)
        except Exception:
            log.exception("video job worker stopped")
        finally:
            with self._lock:
                self._active -= 1

    def recover(self, startup: bool = True) -> dict[str, int]:
        """Re-queue interrupted jobs whose upload is still stored; fail those whose upload is gone."""
        try:
            recovery = self.jobs.recover(self.token)
        except DatabaseUnavailable as exc:
            log.warning("video job recovery skipped: %s", exc)
            return {"requeued": 0, "failed": 0, "callbacks": 0}
        for job_id in recovery.callbacks_due:
            self.runner.callbacks.send(job_id)
        counts = {"requeued": len(recovery.requeued), "failed": len(recovery.failed),
                  "callbacks": len(recovery.callbacks_due)}
        if any(counts.values()):
            log.info("video job recovery (%s): %s", "start-up" if startup else "periodic", counts)
        if startup and recovery.queued:
            self.notify()
        return counts


def init_app(app: Flask) -> None:
    """Start the executor built in api/context.py (in-process: recovery of interrupted jobs)."""
    from api.services.videos import sweep_dead_uploads

    sweep_dead_uploads()  # temporary uploads of workers that died are nobody's now
    app.extensions["d3"].video_jobs.start()
