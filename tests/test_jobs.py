"""The job store (api/services/jobs.py) on its own, without Flask: claims, heartbeats, takeovers,
attempts, and the migration that moved the queue bookkeeping out of the params JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text

from api.database import Database, _alembic_config, upgrade_schema
from api.models import Prediction, VideoPrediction
from api.services.jobs import ClaimOutcome, JobStore, worker_gone
from api.storage import LocalObjectStore, object_key

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = ("res", "vid", "frm")


def make_store(tmp_path: Path, url: str, max_attempts: int = 3, stale_after_s: float = 300.0) -> JobStore:
    store = LocalObjectStore(tmp_path / "objects", BUCKETS, b"test-signing-key")
    store.ensure_buckets()
    return JobStore(Database(url), store, "vid", max_attempts, stale_after_s)


def new_job(jobs: JobStore, tmp_path: Path, created: datetime | None = None) -> uuid.UUID:
    job_id = uuid.uuid4()
    now = created or datetime.now(timezone.utc)
    upload = tmp_path / f"{job_id}.upload"
    upload.write_bytes(b"RIFF0000AVI stand-in for an uploaded video")
    row = Prediction(id=job_id, created_at=now, media_type="video", filename="v.avi", sha256="0" * 64,
                     size_bytes=upload.stat().st_size, threshold=0.5, model_version="test", status="queued")
    row.video = VideoPrediction(aggregation="mean", upload_object=object_key(str(job_id), ".avi", now),
                                progress_done=0, progress_total=4, params={"frames": 4, "async": True})
    jobs.create(row, str(upload))
    return job_id


def dead_worker() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}:gone"


def result_filler(calls: list):
    def fill(row: Prediction) -> list:
        calls.append(row.id)
        row.prediction, row.fake_probability, row.confidence = "real", 0.25, 0.5
        row.result_object = object_key(str(row.id), ".json", row.created_at)
        return [("res", row.result_object, json.dumps({"id": str(row.id)}).encode(), "application/json")]

    return fill


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    upgrade_schema(url)
    return url


# -- one process ---------------------------------------------------------------------------------------------------
def test_claim_heartbeat_complete(tmp_path, db_url):
    jobs = make_store(tmp_path, db_url)
    older = new_job(jobs, tmp_path, datetime.now(timezone.utc) - timedelta(seconds=30))
    newer = new_job(jobs, tmp_path)
    stats = jobs.stats()
    assert stats.queued == 2 and stats.counts == {"queued": 2, "running": 0, "done": 0, "failed": 0}
    assert 29 <= stats.oldest_queued_age_s < 120
    assert jobs.count_active(None) == 2 and jobs.count_active("someone") == 0

    row = jobs.claim_next("w-a")
    assert row.id == older and row.status == "running"  # oldest first
    assert row.video.worker == "w-a" and row.video.attempts == 1 and row.video.claimed_at is not None
    assert jobs.claim(older, "w-b").outcome is ClaimOutcome.BUSY  # a live worker holds it
    assert jobs.heartbeat(older, "w-a", 2, 4) is True
    assert jobs.heartbeat(older, "w-b", 3, 4) is False  # not w-b's: nothing written
    assert jobs.load(older).video.progress_done == 2

    calls: list = []
    assert jobs.complete(older, "w-b", result_filler(calls), keep_upload=True) is None and calls == []
    done = jobs.complete(older, "w-a", result_filler(calls), keep_upload=True)
    assert done.status == "done" and calls == [older]
    assert done.media_object and done.video.upload_object is None  # the upload became the kept video
    assert jobs.claim(older, "w-b").outcome is ClaimOutcome.ENDED
    assert jobs.store.get_bytes("res", done.result_object)
    assert jobs.stats().counts == {"queued": 1, "running": 0, "done": 1, "failed": 0}
    assert jobs.stats().oldest_queued_age_s < 29  # now the newer job is the oldest waiting
    assert jobs.claim_next("w-a").id == newer and jobs.claim_next("w-a") is None


def test_fail_drops_the_upload_and_discard_leaves_nothing(tmp_path, db_url):
    jobs = make_store(tmp_path, db_url)
    job = new_job(jobs, tmp_path)
    upload = jobs.load(job).video.upload_object
    jobs.claim(job, "w-a")
    failed = jobs.fail(job, "w-a", "not a video")
    assert failed.status == "failed" and failed.error == "not a video"
    assert not jobs.store.exists("vid", upload)
    other = new_job(jobs, tmp_path)
    upload = jobs.load(other).video.upload_object
    jobs.discard(other)
    assert jobs.load(other) is None and not jobs.store.exists("vid", upload)


def test_requeue_after_a_lost_heartbeat(tmp_path, db_url):
    jobs = make_store(tmp_path, db_url, stale_after_s=0.5)
    job = new_job(jobs, tmp_path)
    assert jobs.claim(job, "host-elsewhere:1:a").outcome is ClaimOutcome.CLAIMED
    assert jobs.recover().requeued == []  # heartbeat still fresh
    time.sleep(0.7)  # ... and then it stops
    recovery = jobs.recover()
    assert recovery.requeued == [job] and job in recovery.queued
    row = jobs.load(job)
    assert row.status == "queued" and row.video.worker is None and row.video.requeued == 1
    assert "went silent" in row.error and "attempt 1 was interrupted" in row.error
    # The silent worker comes back: its claim is gone, so it writes nothing.
    assert jobs.heartbeat(job, "host-elsewhere:1:a") is False
    calls: list = []
    assert jobs.complete(job, "host-elsewhere:1:a", result_filler(calls), keep_upload=False) is None
    assert calls == []
    claim = jobs.claim(job, "w-b")
    assert claim.outcome is ClaimOutcome.CLAIMED and claim.row.video.attempts == 2
    done = jobs.complete(job, "w-b", result_filler(calls), keep_upload=False)
    assert done.status == "done" and done.error is None and calls == [job]


def test_a_job_runs_twice_but_is_done_once(tmp_path, db_url):
    """A presumed-dead worker is taken over; when both finish, only the claim holder's result counts."""
    jobs = make_store(tmp_path, db_url, stale_after_s=0.5)
    job = new_job(jobs, tmp_path)
    jobs.claim(job, "host-elsewhere:1:slow")
    time.sleep(0.7)
    claim = jobs.claim(job, "w-new")  # a redelivered message: takes over the silent worker's job
    assert claim.outcome is ClaimOutcome.CLAIMED
    assert claim.row.video.worker == "w-new" and claim.row.video.attempts == 2 and claim.row.video.requeued == 1
    first: list = []
    second: list = []
    assert jobs.complete(job, "host-elsewhere:1:slow", result_filler(first), keep_upload=True) is None
    assert jobs.complete(job, "w-new", result_filler(second), keep_upload=True).status == "done"
    assert jobs.complete(job, "w-new", result_filler(second), keep_upload=True) is None  # and only once
    assert first == [] and second == [job]


def test_attempts_run_out_and_the_job_fails_with_its_reason(tmp_path, db_url):
    jobs = make_store(tmp_path, db_url, max_attempts=2, stale_after_s=300)
    job = new_job(jobs, tmp_path)
    upload = jobs.load(job).video.upload_object
    jobs.claim(job, "w-a")
    again = jobs.retry_later(job, "w-a", "the video decoder crashed (SIGKILL)")
    assert again.status == "queued" and again.error == "attempt 1 failed: the video decoder crashed (SIGKILL)"
    worker = dead_worker()  # attempt 2 dies with its process
    assert jobs.claim(job, worker).outcome is ClaimOutcome.CLAIMED
    claim = jobs.claim(job, "w-c")  # its worker is dead: a takeover would be attempt 3 of 2
    assert claim.outcome is ClaimOutcome.ENDED
    row = jobs.load(job)
    assert row.status == "failed" and row.video.attempts == 2
    assert row.error.startswith("gave up after 2 attempts; the last one: attempt 2 was interrupted: its worker")
    assert "is no longer running" in row.error
    assert not jobs.store.exists("vid", upload)
    # retry_later by the holder of the last attempt fails it too
    other = new_job(jobs, tmp_path)
    jobs.claim(other, "w-a")
    jobs.retry_later(other, "w-a", "store down")
    jobs.claim(other, "w-a")
    assert jobs.retry_later(other, "w-a", "store down").status == "failed"
    assert jobs.load(other).error == "gave up after 2 attempts; the last one: store down"


def test_recovery_fails_jobs_whose_upload_is_gone(tmp_path, db_url):
    jobs = make_store(tmp_path, db_url)
    queued, running = new_job(jobs, tmp_path), new_job(jobs, tmp_path)
    jobs.claim(running, dead_worker())
    for job in (queued, running):
        jobs.store.delete("vid", jobs.load(job).video.upload_object)
    recovery = jobs.recover()
    assert sorted(recovery.failed) == sorted([queued, running]) and recovery.queued == []
    assert "interrupted by a restart" in jobs.load(running).error
    assert "no longer stored" in jobs.load(queued).error


def test_who_counts_as_gone():
    now = datetime.now(timezone.utc)
    fresh, old = now - timedelta(seconds=1), now - timedelta(seconds=400)
    assert worker_gone("elsewhere:12:x", fresh, now, 300) is None
    assert "went silent" in worker_gone("elsewhere:12:x", old, now, 300)
    assert "no longer running" in worker_gone(dead_worker(), fresh, now, 300)
    assert worker_gone(f"{socket.gethostname()}:{os.getpid()}:me", fresh, now, 300, own_token="other") is not None
    assert worker_gone("tok", old, now, 300, own_token="tok") is None
    assert worker_gone(None, fresh, now, 300) == "it had no worker"


# -- two processes on PostgreSQL ---------------------------------------------------------------------------------
RACER = textwrap.dedent("""
    import json, sys, time, uuid
    from pathlib import Path
    from api.database import Database
    from api.services.jobs import ClaimOutcome, JobStore
    from api.storage import LocalObjectStore
    url, objects, mode, token, start_at = sys.argv[1:6]
    ids = [uuid.UUID(i) for i in sys.argv[6:]]
    jobs = JobStore(Database(url), LocalObjectStore(Path(objects), ("res", "vid", "frm"), b"k"), "vid", 5, 300.0)
    jobs.db.ping()
    while time.time() < float(start_at):
        pass
    won = []
    if mode == "next":
        while (row := jobs.claim_next(token)) is not None:
            won.append(str(row.id))
    else:
        for job in ids:
            if jobs.claim(job, token).outcome is ClaimOutcome.CLAIMED:
                won.append(str(job))
    print(json.dumps(won))
""")


def race(url: str, tmp_path: Path, mode: str, ids: list[uuid.UUID]) -> list[list[str]]:
    start_at = str(time.time() + 4.0)  # both interpreters are up by then: they start claiming together
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", RACER, url, str(tmp_path / "objects"), mode, f"racer-{n}",
                                   start_at, *map(str, ids)], stdout=subprocess.PIPE, env=env, cwd=ROOT)
                 for n in range(2)]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        results.append(json.loads(out))
    return results


def test_two_processes_never_claim_the_same_job(tmp_path, postgres_url):
    jobs = make_store(tmp_path, postgres_url)
    ids = [new_job(jobs, tmp_path) for _ in range(40)]
    first, second = race(postgres_url, tmp_path, "next", [])
    assert set(first).isdisjoint(second)
    assert sorted(first + second) == sorted(map(str, ids))
    for job in ids:
        video = jobs.load(job).video
        assert video.attempts == 1 and video.worker == ("racer-0" if str(job) in first else "racer-1")


def test_two_processes_race_to_take_over_the_same_lost_jobs(tmp_path, postgres_url):
    jobs = make_store(tmp_path, postgres_url)
    ids = [new_job(jobs, tmp_path) for _ in range(30)]
    lost = dead_worker()
    for job in ids:
        assert jobs.claim(job, lost).outcome is ClaimOutcome.CLAIMED
    first, second = race(postgres_url, tmp_path, "same", ids)  # both try every job, in the same order
    assert set(first).isdisjoint(second) and sorted(first + second) == sorted(map(str, ids))
    for job in ids:
        video = jobs.load(job).video
        assert video.attempts == 2 and video.requeued == 1 and video.worker in ("racer-0", "racer-1")


# -- the migration ------------------------------------------------------------------------------------------------
def test_migration_moves_old_bookkeeping_into_columns(tmp_path, db_url):
    """Rows written the old way (claim in the params JSON) read like new ones after `d3 db upgrade`."""
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    else:
        with Database(db_url).engine.begin() as conn:  # the fixture migrated it: start again from 0001
            conn.execute(text("DROP TABLE active_model, model_versions, video_predictions, predictions, api_keys, "
                              "alembic_version"))
    upgrade_schema(db_url, "0001")
    db = Database(db_url)
    running, finished = uuid.uuid4(), uuid.uuid4()
    claimed = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
    beat = datetime.now(timezone.utc) - timedelta(seconds=5)
    with db.engine.begin() as conn:
        for job, status, params in [
            (running, "running", {"frames": 4, "async": True, "worker": dead_worker(),
                                  "claimed_at": claimed.isoformat(), "requeued": 2}),
            (finished, "done", {"frames": 4, "async": True, "sampling": {"mode": "frames"}}),
        ]:
            conn.execute(text("INSERT INTO predictions (id, created_at, media_type, sha256, size_bytes, threshold, "
                              "model_version, status) VALUES (:id, :created, 'video', :sha, 10, 0.5, 'm', :status)"),
                         {"id": job.hex if db_url.startswith("sqlite") else str(job), "created": claimed,
                          "sha": "0" * 64, "status": status})
            conn.execute(text("INSERT INTO video_predictions (prediction_id, aggregation, progress_done, "
                              "progress_total, params, updated_at, upload_object) VALUES (:id, 'mean', 1, 4, "
                              ":params, :beat, :upload)"),
                         {"id": job.hex if db_url.startswith("sqlite") else str(job), "params": json.dumps(params),
                          "beat": beat, "upload": "2026/11/30/x.avi" if status == "running" else None})
    db.dispose()
    upgrade_schema(db_url)
    jobs = make_store(tmp_path, db_url)
    old = jobs.load(running)
    assert old.status == "running" and old.video.worker.endswith(":gone")
    assert old.video.claimed_at.replace(tzinfo=timezone.utc) == claimed
    assert old.video.requeued == 2 and old.video.attempts == 1 and old.video.heartbeat_at is not None
    assert old.video.params == {"frames": 4, "async": True}  # the bookkeeping left the JSON
    assert jobs.load(finished).video.params == {"frames": 4, "async": True, "sampling": {"mode": "frames"}}
    assert jobs.load(finished).video.attempts == 0
    # The new code treats the old running row like any other: its worker is gone, so it may be taken over.
    jobs.store.put_bytes("vid", "2026/11/30/x.avi", b"video", "video/x-msvideo")
    assert jobs.recover().requeued == [running]
    assert jobs.load(running).video.requeued == 3
    jobs.db.dispose()
    command.downgrade(_alembic_config(db_url), "0001")  # and back: the keys return to the JSON
    with Database(db_url).engine.connect() as conn:
        params = conn.execute(text("SELECT params FROM video_predictions WHERE progress_total = 4 "
                                   "AND upload_object IS NOT NULL")).scalar_one()
    params = json.loads(params) if isinstance(params, str) else params
    assert params["requeued"] == 3 and params["attempts"] == 1 and "worker" not in params  # re-queued: no worker

