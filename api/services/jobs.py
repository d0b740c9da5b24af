"""Video job state: the one module that writes job rows (status, claim, heartbeat, progress, callback).

A job is a `predictions` row (media_type video) with its `video_predictions` row; the upload waits
in the videos bucket (`upload_object`) until the job ends. States: queued -> running -> done |
failed, and running -> queued again when an attempt is interrupted.

The claim decides who may finish a job. Claiming a queued job is one conditional UPDATE
(queued -> running) that records the worker's token; every later step of that attempt (progress,
heartbeat, completion, failure, re-queueing) starts with an UPDATE conditioned on that token, so a
worker that lost its claim (presumed dead, then taken over) writes nothing, and the row lock that
UPDATE takes (PostgreSQL) or the write lock (SQLite) keeps a takeover out until it commits. A job
therefore ends `done` at most once, even when two workers run it.

A running job whose worker is gone (same host and the process is dead, or no heartbeat for
JOB_STALE_AFTER_S) may be taken over or re-queued; every claim counts an attempt, and a job whose
JOB_MAX_ATTEMPTS attempts all ended without a verdict is failed with the last reason.
"""

from __future__ import annotations

import enum
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update

from api.database import Database
from api.exceptions import DatabaseUnavailable, StoreUnavailable
from api.models import Prediction, VideoPrediction
from api.services.records import StoredObject, delete_objects, insert_with_objects, put_objects
from api.storage import ObjectStore

log = logging.getLogger(__name__)
JOB_MEDIA_TYPES = ("video", "audio")  # speech jobs are rows of the same shape (api/services/audio.py)

STATUSES = ("queued", "running", "done", "failed")
ACTIVE = ("queued", "running")
ENDED = ("done", "failed")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=timezone.utc)
    return value


def worker_token() -> str:
    """host:pid:random, unique per worker process (or per executor in one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_gone(worker: str | None, heartbeat: datetime | None, now: datetime, stale_after_s: float,
                own_token: str | None = None) -> str | None:
    """Why the worker holding a running job is presumed lost (None: it is presumed alive)."""
    if not worker:
        return "it had no worker"
    if worker == own_token:
        return None
    host, _, rest = worker.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid() and own_token is not None:
            return f"its worker {worker} was an earlier process with this pid"
        if pid != os.getpid() and not pid_alive(pid):
            return f"its worker {worker} is no longer running"
    beat = aware(heartbeat)
    if beat is None or now - beat > timedelta(seconds=stale_after_s):
        since = beat.isoformat(timespec="seconds") if beat else "never"
        return f"its worker {worker} went silent (last heartbeat: {since})"
    return None


class ClaimOutcome(enum.Enum):
    CLAIMED = "claimed"  # run it now
    BUSY = "busy"  # another live worker holds it: look again later
    ENDED = "ended"  # done or failed (maybe just now, out of attempts), or gone: nothing to do


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    row: Prediction | None = None


@dataclass(frozen=True)
class QueueStats:
    counts: dict[str, int]
    queued: int
    oldest_queued_age_s: float


@dataclass(frozen=True)
class Recovery:
    requeued: list[uuid.UUID]
    failed: list[uuid.UUID]
    queued: list[uuid.UUID]  # every job left queued (for an executor to hand out again)
    callbacks_due: list[uuid.UUID]


class JobStore:
    """Every write to a job row goes through here; the executors and the video service call it."""

    def __init__(self, db: Database, store: ObjectStore, bucket_uploads: str, max_attempts: int,
                 stale_after_s: float) -> None:
        self.db = db
        self.store = store
        self.bucket_uploads = bucket_uploads  # where every job's upload waits (BUCKET_VIDEOS, audio jobs too)
        self.max_attempts = max_attempts
        self.stale_after_s = stale_after_s

    # ---------------------------------------------------------------- create and count
    def create(self, row: Prediction, upload_path: str) -> Prediction:
        """Store the upload, then the queued row (all or nothing; Unavailable if either fails)."""
        row.status, row.error = "queued", None
        row.video.callback_status = "pending" if row.video.callback_url else None
        insert_with_objects(self.db, self.store, row,
                            [(self.bucket_uploads, row.video.upload_object, upload_path,
                              "video/octet-stream" if row.media_type == "video" else "application/octet-stream")])
        return row

    def discard(self, job_id: uuid.UUID) -> None:
        """Remove a job that never reached the queue: its row and its upload, as if never submitted."""
        with self.db.session() as session:
            upload = session.scalar(select(VideoPrediction.upload_object)
                                    .where(VideoPrediction.prediction_id == job_id))
            session.execute(delete(VideoPrediction).where(VideoPrediction.prediction_id == job_id))
            session.execute(delete(Prediction).where(Prediction.id == job_id, Prediction.status == "queued"))
        if upload:
            delete_objects(self.store, [(self.bucket_uploads, upload)])

    def count_active(self, owner: str | None) -> int:
        query = (select(func.count()).select_from(Prediction)
                 .where(Prediction.media_type.in_(JOB_MEDIA_TYPES), Prediction.status.in_(ACTIVE),
                        Prediction.owner.is_(None) if owner is None else Prediction.owner == owner))
        with self.db.session() as session:
            return int(session.scalar(query) or 0)

    def stats(self) -> QueueStats:
        """Jobs by status, and the queue an autoscaler watches: its length and its oldest job's age."""
        with self.db.session() as session:
            counts = dict(session.execute(select(Prediction.status, func.count())
                                          .where(Prediction.media_type.in_(JOB_MEDIA_TYPES))
                                          .group_by(Prediction.status)).all())
            oldest = session.scalar(select(func.min(Prediction.created_at))
                                    .where(Prediction.media_type.in_(JOB_MEDIA_TYPES), Prediction.status == "queued"))
        age = max(0.0, (utcnow() - aware(oldest)).total_seconds()) if oldest is not None else 0.0
        return QueueStats(counts={status: int(counts.get(status, 0)) for status in STATUSES},
                          queued=int(counts.get("queued", 0)), oldest_queued_age_s=age)

    def load(self, job_id: uuid.UUID) -> Prediction | None:
        with self.db.session() as session:
            return session.get(Prediction, job_id)

    def oldest_queued(self, limit: int = 10) -> list[uuid.UUID]:
        with self.db.session() as session:
            return list(session.scalars(
                select(Prediction.id).where(Prediction.media_type.in_(JOB_MEDIA_TYPES), Prediction.status == "queued")
                .order_by(Prediction.created_at).limit(limit)))

    # ---------------------------------------------------------------- claim
    def claim(self, job_id: uuid.UUID, worker: str) -> Claim:
        """Take a job for `worker`: a queued one, or a running one whose worker is gone."""
        now = utcnow()
        with self.db.session() as session:
            row = session.get(Prediction, job_id)
            if row is None or row.video is None or row.status in ENDED:
                return Claim(ClaimOutcome.ENDED, row)
            video = row.video
            if row.status == "running":
                why = worker_gone(video.worker, video.heartbeat_at, now, self.stale_after_s, worker)
                if why is None:
                    return Claim(ClaimOutcome.BUSY, row)
                takeover, held_by, beat = True, video.worker, video.heartbeat_at
                attempts = video.attempts
                reason = f"attempt {attempts} was interrupted: {why}"
            else:
                takeover, held_by, beat = False, None, None
                attempts, reason = video.attempts, row.error
        if attempts >= self.max_attempts:
            ended = self._give_up(job_id, takeover, held_by, beat, attempts, reason)
            return Claim(ClaimOutcome.ENDED if ended is not None else ClaimOutcome.BUSY, ended)
        with self.db.session() as session:
            if not takeover:
                taken = session.execute(update(Prediction).where(Prediction.id == job_id,
                                                                 Prediction.status == "queued")
                                        .values(status="running")).rowcount == 1
                values = {}
            else:  # a takeover: only if nobody moved the claim since we judged it lost
                taken = session.execute(update(VideoPrediction).where(*self._held(job_id, held_by, beat))
                                        .values(worker=worker)).rowcount == 1
                values = {"requeued": VideoPrediction.requeued + 1}
            if not taken:
                return Claim(ClaimOutcome.BUSY)
            session.execute(update(VideoPrediction).where(VideoPrediction.prediction_id == job_id).values(
                worker=worker, claimed_at=now, heartbeat_at=now, attempts=VideoPrediction.attempts + 1,
                progress_done=0, **values))
            row = session.get(Prediction, job_id, populate_existing=True)
            if row.status != "running":  # ended meanwhile (a legacy row without a worker)
                session.rollback()
                return Claim(ClaimOutcome.ENDED, row)
        return Claim(ClaimOutcome.CLAIMED, row)

    def claim_next(self, worker: str) -> Prediction | None:
        """The oldest queued job, claimed (in-process executor)."""
        for job_id in self.oldest_queued():
            claim = self.claim(job_id, worker)
            if claim.outcome is ClaimOutcome.CLAIMED:
                return claim.row
        return None

    @staticmethod
    def _held(job_id: uuid.UUID, worker: str | None, beat: datetime | None) -> list:
        conditions = [VideoPrediction.prediction_id == job_id,
                      VideoPrediction.worker == worker if worker else VideoPrediction.worker.is_(None)]
        if beat is not None:
            conditions.append(VideoPrediction.heartbeat_at == beat)
        return conditions

    def _give_up(self, job_id: uuid.UUID, takeover: bool, held_by: str | None, beat: datetime | None,
                 attempts: int, reason: str | None) -> Prediction | None:
        message = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}"
        message += f"; the last one: {reason}" if reason else ""
        return self._end_failed(job_id, self._held(job_id, held_by, beat) if takeover else None, message)

    # ---------------------------------------------------------------- while running
    def heartbeat(self, job_id: uuid.UUID, worker: str, done: int | None = None, total: int | None = None) -> bool:
        """Record a sign of life (and progress); False when the claim is no longer this worker's."""
        values: dict = {"heartbeat_at": utcnow()}
        if done is not None:
            values.update(progress_done=done, progress_total=total)
        try:
            with self.db.session() as session:
                return session.execute(update(VideoPrediction).where(
                    VideoPrediction.prediction_id == job_id, VideoPrediction.worker == worker)
                    .values(**values)).rowcount == 1
        except DatabaseUnavailable as exc:
            log.warning("video job %s: heartbeat not recorded (%s)", job_id, exc)
            return True  # not known to be lost

    # ---------------------------------------------------------------- endings
    def complete(self, job_id: uuid.UUID, worker: str, fill: Callable[[Prediction], list[StoredObject]],
                 keep_upload: bool) -> Prediction | None:
        """done, if `worker` still holds the claim: `fill` sets the result fields and names the objects.

        Objects are written while the claim is locked; if the rows then fail, the objects go.
        None: the job is not this worker's any more (nothing written).
        """
        written: list[tuple[str, str]] = []
        try:
            with self.db.session() as session:
                row = self._held_running(session, job_id, worker)
                if row is None:
                    return None
                objects = fill(row)
                row.status, row.error = "done", None
                upload_key = row.video.upload_object
                if keep_upload:
                    row.media_object = upload_key  # the upload becomes the kept video: no second copy
                row.video.upload_object = None
                written = put_objects(self.store, objects)
        except DatabaseUnavailable:
            log.error("video job %s: the database is unavailable, its results were not stored", job_id)
            delete_objects(self.store, written)
            raise
        if not keep_upload and upload_key:
            delete_objects(self.store, [(self.bucket_uploads, upload_key)])
        return row

    def fail(self, job_id: uuid.UUID, worker: str | None, message: str) -> Prediction | None:
        """failed with a reason, upload dropped; `worker=None`: whoever holds it (recovery of a lost job)."""
        return self._end_failed(job_id, None if worker is None else [VideoPrediction.prediction_id == job_id,
                                                                     VideoPrediction.worker == worker], message)

    def _end_failed(self, job_id: uuid.UUID, held: list | None, message: str) -> Prediction | None:
        with self.db.session() as session:
            if held is not None and session.execute(update(VideoPrediction).where(*held)
                                                    .values(heartbeat_at=utcnow())).rowcount != 1:
                return None
            row = session.get(Prediction, job_id, populate_existing=True)
            if row is None or row.status in ENDED:
                return None
            upload_key = row.video.upload_object if row.video is not None else None
            row.status, row.error = "failed", message[:2000]
            if row.video is not None:
                row.video.upload_object = None
        if upload_key:
            delete_objects(self.store, [(self.bucket_uploads, upload_key)])
        return row

    def retry_later(self, job_id: uuid.UUID, worker: str, reason: str) -> Prediction | None:
        """An attempt ended without a verdict for a reason that may pass (decoder killed, store down):
        back to queued with the reason, or failed once the attempts are spent. None: not ours."""
        with self.db.session() as session:
            row = self._held_running(session, job_id, worker)
            if row is None:
                return None
            attempts = row.video.attempts
        if attempts >= self.max_attempts:
            return self._end_failed(job_id, [VideoPrediction.prediction_id == job_id,
                                             VideoPrediction.worker == worker],
                                    f"gave up after {attempts} attempts; the last one: {reason}")
        with self.db.session() as session:
            if session.execute(update(VideoPrediction).where(VideoPrediction.prediction_id == job_id,
                                                             VideoPrediction.worker == worker)
                               .values(worker=None, progress_done=0,
                                       requeued=VideoPrediction.requeued + 1)).rowcount != 1:
                return None
            session.execute(update(Prediction).where(Prediction.id == job_id, Prediction.status == "running")
                            .values(status="queued", error=f"attempt {attempts} failed: {reason}"[:2000]))
            return session.get(Prediction, job_id, populate_existing=True)

    @staticmethod
    def _held_running(session, job_id: uuid.UUID, worker: str) -> Prediction | None:
        """The running job, its claim held for the rest of this transaction (a row lock), if the
        claim is still `worker`'s; None otherwise."""
        if session.execute(update(VideoPrediction).where(
                VideoPrediction.prediction_id == job_id, VideoPrediction.worker == worker)
                .values(heartbeat_at=utcnow())).rowcount != 1:
            return None
        row = session.get(Prediction, job_id, populate_existing=True)
        return row if row is not None and row.status == "running" else None

    # ---------------------------------------------------------------- recovery
    def recover(self, own_token: str | None = None) -> Recovery:
        """Re-queue running jobs whose worker is gone (or fail them when their upload is gone too);
        fail queued jobs whose upload is gone; list callbacks that are due again."""
        now = utcnow()
        requeued: list[uuid.UUID] = []
        failed: list[uuid.UUID] = []
        with self.db.session() as session:
            # A delivery whose process died mid-way ("sending", silent since) is due again.
            session.execute(update(VideoPrediction)
                            .where(VideoPrediction.callback_status == "sending",
                                   VideoPrediction.updated_at < now - timedelta(seconds=self.stale_after_s))
                            .values(callback_status="pending"))
            rows = list(session.scalars(select(Prediction).where(Prediction.media_type.in_(JOB_MEDIA_TYPES),
                                                                 Prediction.status.in_(ACTIVE))))
            callbacks = list(session.scalars(
                select(VideoPrediction.prediction_id).join(Prediction)
                .where(Prediction.status.in_(ENDED), VideoPrediction.callback_status == "pending")))
        for row in rows:
            video = row.video
            if video is None:
                continue
            why = None
            if row.status == "running":
                why = worker_gone(video.worker, video.heartbeat_at, now, self.stale_after_s, own_token)
                if why is None:
                    continue
            try:
                stored = bool(video.upload_object) and self.store.exists(self.bucket_uploads, video.upload_object)
            except (StoreUnavailable, ValueError):
                log.warning("video job %s: object store unavailable, recovery postponed", row.id)
                continue
            try:
                if stored and row.status == "running":
                    if self._requeue_lost(row.id, video.worker, video.heartbeat_at,
                                          f"attempt {video.attempts} was interrupted: {why}"):
                        requeued.append(row.id)
                elif not stored:
                    reason = ("interrupted by a restart, and its uploaded video is no longer stored; resubmit it"
                              if row.status == "running" else "its uploaded video is no longer stored; resubmit it")
                    held = self._held(row.id, video.worker, video.heartbeat_at) if row.status == "running" else None
                    if self._end_failed(row.id, held, reason) is not None:
                        failed.append(row.id)
                        if video.callback_url:
                            callbacks.append(row.id)
            except DatabaseUnavailable as exc:
                log.warning("video job %s not recovered: %s", row.id, exc)
        queued = [row.id for row in rows if row.status == "queued" and row.id not in failed] + requeued
        return Recovery(requeued=requeued, failed=failed, queued=queued, callbacks_due=list(dict.fromkeys(callbacks)))

    def _requeue_lost(self, job_id: uuid.UUID, worker: str | None, beat: datetime | None, reason: str) -> bool:
        with self.db.session() as session:
            if session.execute(update(VideoPrediction).where(*self._held(job_id, worker, beat))
                               .values(worker=None, progress_done=0,
                                       requeued=VideoPrediction.requeued + 1)).rowcount != 1:
                return False
            if session.execute(update(Prediction).where(Prediction.id == job_id, Prediction.status == "running")
                               .values(status="queued", error=reason[:2000])).rowcount != 1:
                session.rollback()
                return False
        return True

    # ---------------------------------------------------------------- callbacks
    def claim_callback(self, job_id: uuid.UUID) -> bool:
        """pending -> sending, once: only one process delivers a job's callback."""
        with self.db.session() as session:
            return session.execute(update(VideoPrediction).where(VideoPrediction.prediction_id == job_id,
                                                                 VideoPrediction.callback_status == "pending")
                                   .values(callback_status="sending")).rowcount == 1

    def record_callback(self, job_id: uuid.UUID, status: str) -> None:
        with self.db.session() as session:
            session.execute(update(VideoPrediction).where(VideoPrediction.prediction_id == job_id)
                            .values(callback_status=status[:64]))
