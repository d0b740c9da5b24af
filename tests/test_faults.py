"""Each outside system frozen (SIGSTOP) or gone, one fix at a time: deadlines, fail fast, nothing left behind.

Real servers in processes of their own (tests/fault_servers.py): PostgreSQL, moto's S3 server,
redis-server. The service-level proof (all three frozen under concurrent load, a worker killed)
is in tests/test_faults_service.py.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from minio import Minio
from sqlalchemy import func, select, text

from api.database import Database, DatabaseUnavailable, upgrade_schema
from api.exceptions import Unavailable
from api.health_probe import HealthProber, store_check
from api.models import Prediction
from api.services.records import put_objects
from api.storage import MinioObjectStore, StoreUnavailable
from tests.fault_servers import wait_until
from tests.helpers import image_bytes, make_app, multipart_body

pytest_plugins = ["tests.fault_servers"]  # the freezable servers' fixtures

pytestmark = pytest.mark.timeout(120)


def elapsed(fn) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


# -- PostgreSQL -------------------------------------------------------------------------------------
def test_frozen_postgres_ends_at_the_deadline_then_fails_fast_then_recovers(freezable_postgres):
    url = freezable_postgres.create_database()
    db = Database(url, timeout_s=1.0, fail_max=2)
    try:
        def query() -> None:
            with db.session() as session:
                session.execute(text("SELECT 1"))

        query()  # a pooled connection exists now: the case connect_timeout never covers
        with freezable_postgres.frozen():
            took, error = elapsed(query)
            assert isinstance(error, DatabaseUnavailable) and 0.9 <= took < 3.0, (took, error)
            took, error = elapsed(query)  # a fresh connection: the startup exchange has the deadline too
            assert isinstance(error, DatabaseUnavailable) and took < 3.0, (took, error)
            assert db.guard.is_open  # two failures: the breaker is open
            took, error = elapsed(query)
            assert isinstance(error, DatabaseUnavailable) and took < 0.1, (took, error)
            assert "failing fast" in str(error)
            took, error = elapsed(lambda: db.probe(0.5))  # the prober's own, shorter deadline
            assert isinstance(error, DatabaseUnavailable) and took < 2.0
        db.probe(2.0)
        db.guard.mark_up()  # what the prober does when it sees the database again
        query()
    finally:
        db.dispose()


def test_a_prober_verdict_opens_and_closes_the_breaker(freezable_postgres):
    url = freezable_postgres.create_database()
    db = Database(url, timeout_s=1.0)
    from api.health_probe import database_check

    prober = HealthProber(interval_s=0.1, timeout_s=0.3)
    prober.add("database", database_check(db, 2.0), guard=db.guard)
    prober.start()
    try:
        assert prober.verdict("database").ok
        with freezable_postgres.frozen():
            # The check itself is stuck for 2 s; the prober calls it down at its 0.3 s timeout.
            verdict = wait_until(lambda: (v := prober.verdict("database")) and not v.ok and v, 3, what="down")
            assert "no answer within 0.3 s" in verdict.error
            # The breaker opens on the second failed probe in a row (one slow answer is no outage).
            wait_until(lambda: db.guard.is_open, 5, what="the breaker open")
            took, error = elapsed(lambda: db.session().__enter__())
            assert isinstance(error, DatabaseUnavailable) and took < 0.1
        wait_until(lambda: prober.verdict("database").ok, 5, what="up again")
        assert not db.guard.is_open
        with db.session() as session:
            assert session.execute(text("SELECT 2")).scalar() == 2
    finally:
        prober.stop()
        db.dispose()


# -- the object store ---------------------------------------------------------------------------------
def minio_store(moto_s3, **kwargs) -> MinioObjectStore:
    suffix = uuid.uuid4().hex[:8]
    store = MinioObjectStore(moto_s3.endpoint, moto_s3.access_key, moto_s3.secret_key, secure=False,
                             region="us-east-1", buckets=(f"res-{suffix}", f"vid-{suffix}", f"frm-{suffix}"),
                             **kwargs)
    store.ensure_buckets()
    return store


def test_frozen_store_call_ends_within_its_budget_then_fails_fast(moto_s3):
    store = minio_store(moto_s3, timeout_s=0.5, retries=1, fail_max=2)
    bucket = store.buckets[0]
    store.put_bytes(bucket, "2026/01/01/warm.json", b"{}", "application/json")
    with moto_s3.frozen():
        for attempt in range(2):
            took, error = elapsed(lambda: store.put_bytes(bucket, "2026/01/01/a.json", b"{}", "application/json"))
            assert isinstance(error, StoreUnavailable), error
            assert took <= store.budget_s + 0.5, (attempt, took, store.budget_s)
        took, error = elapsed(lambda: store.get_bytes(bucket, "2026/01/01/warm.json"))
        assert isinstance(error, StoreUnavailable) and took < 0.1 and "failing fast" in str(error)
    store.guard.mark_up()
    assert store.get_bytes(bucket, "2026/01/01/warm.json") == b"{}"


def test_a_put_that_timed_out_and_landed_later_is_removed(moto_s3):
    store = minio_store(moto_s3, timeout_s=0.5, retries=0)
    bucket = store.buckets[0]
    key = f"2026/01/01/{uuid.uuid4()}.json"
    with moto_s3.frozen():
        with pytest.raises(Unavailable, match="object store"):
            put_objects(store, [(bucket, key, b'{"late": true}', "application/json")])
        assert len(store.pending_deletes) == 1  # the delete is owed: the store is frozen
    # Thawed: the server now handles the put it had buffered (and the delete that timed out, in
    # either order). The owed delete removes the object whatever the order, and keeps deleting
    # for a while in case the put lands after the first delete. Today's code never deletes a key
    # whose put failed, so the late put stays.
    store.guard.mark_up()
    time.sleep(1.0)
    store.pending_deletes.retry()
    assert not store.exists(bucket, key)
    assert len(store.pending_deletes) == 1  # still watched until PendingDeletes.SETTLE_S has passed


def test_a_missing_bucket_counts_and_is_created_again(moto_s3):
    store = minio_store(moto_s3, timeout_s=1.0)
    frames = store.buckets[2]
    raw = Minio(moto_s3.endpoint, access_key=moto_s3.access_key, secret_key=moto_s3.secret_key, secure=False)
    raw.remove_bucket(frames)
    assert store.missing_buckets() == [frames]
    assert store.ping() is False  # today's ping drops bucket_exists()'s answer
    prober = HealthProber(interval_s=10, timeout_s=3)
    prober.add("object_store", store_check(store), guard=store.guard)
    assert prober.probe_now("object_store").ok
    assert raw.bucket_exists(frames)


# -- batch requests ------------------------------------------------------------------------------------
def test_batch_with_the_database_down_is_one_503_not_per_file_errors(tmp_path, tiny_engine, freezable_postgres):
    url = freezable_postgres.create_database()
    upgrade_schema(url)
    app = make_app(tmp_path, tiny_engine, DATABASE_URL=url, DB_TIMEOUT_S="1")
    client = app.test_client()
    body, content_type = multipart_body([("files", ("a.png", image_bytes(seed=1))),
                                         ("files", ("b.png", image_bytes(seed=2))),
                                         ("files", ("bad.png", b"not an image"))])
    with freezable_postgres.frozen():
        response = client.post("/predict/batch", data=body, content_type=content_type)
    assert response.status_code == 503, response.get_json()
    assert response.headers["Retry-After"].isdigit()
    assert "database" in response.get_json()["error"]["message"]
    # Back up: input errors are still per file.
    wait_until(lambda: client.get("/health").status_code == 200, 10, what="healthy again")
    response = client.post("/predict/batch", data=body, content_type=content_type)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r.get("error", {}).get("code") for r in results][2] is not None
    assert results[0].get("prediction") in ("fake", "real")


# -- temp files of dead workers -------------------------------------------------------------------------
def test_temp_uploads_of_dead_workers_are_swept_at_start_up(tmp_path, tiny_engine):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tempfile.gettempdir()
    dead_file = os.path.join(folder, f"d3-video-{dead.pid}-leftover.upload")
    job_file = os.path.join(folder, f"d3-job-{dead.pid}-leftover.upload")
    live_file = os.path.join(folder, f"d3-video-{os.getpid()}-mine.upload")
    for path in (dead_file, job_file, live_file):
        with open(path, "wb") as out:
            out.write(b"\0" * 1024)
    try:
        make_app(tmp_path, tiny_engine)
        assert not os.path.exists(dead_file) and not os.path.exists(job_file)
        assert os.path.exists(live_file)  # a live process's upload is not touched
    finally:
        for path in (dead_file, job_file, live_file):
            if os.path.exists(path):
                os.unlink(path)


def test_spooled_uploads_carry_the_pid():
    from api.services.videos import spool_upload

    upload = spool_upload(io.BytesIO(b"x" * 10), "clip.mp4", 100)
    try:
        assert os.path.basename(upload.path).startswith(f"d3-video-{os.getpid()}-")
    finally:
        upload.remove()


# -- Redis (rate-limit counters) -------------------------------------------------------------------------
def redis_keys(redis_proc) -> int:
    import redis

    return len(redis.Redis.from_url(redis_proc.url).keys("*"))


def test_frozen_redis_costs_one_short_wait_and_the_fallback_ends_with_the_freeze(tmp_path, tiny_engine, redis_proc):
    app = make_app(tmp_path, tiny_engine, REDIS_URL=redis_proc.url, REDIS_TIMEOUT_S="0.3",
                   PROBE_INTERVAL_S="0.1", PROBE_TIMEOUT_S="0.3", RATE_LIMIT_DEFAULT="100000/minute")
    client = app.test_client()
    assert client.get("/predictions").status_code == 200
    assert redis_keys(redis_proc) > 0  # counters live in Redis
    times = []
    with redis_proc.frozen():
        for _ in range(15):
            started = time.monotonic()
            assert client.get("/predictions").status_code == 200  # limits fall back, requests go on
            times.append(time.monotonic() - started)
            time.sleep(0.05)
        health = client.get("/health").get_json()
        assert "redis" in health["down"] and health["systems"]["redis"]["ok"] is False
    assert max(times) < 1.5, times  # at most one socket deadline, never redis-py's retries
    assert sorted(times)[len(times) // 2] < 0.2, times  # once seen down, no request waits on Redis
    import redis

    redis.Redis.from_url(redis_proc.url).flushall()
    wait_until(lambda: client.get("/health").get_json()["systems"]["redis"]["ok"], 3, what="redis up")
    assert client.get("/predictions").status_code == 200
    assert redis_keys(redis_proc) > 0  # back on Redis right after the thaw, not after a back-off


def test_a_celery_broker_of_its_own_is_probed_and_named_when_frozen(tmp_path, tiny_engine, redis_proc):
    # A broker that is not the limiter's REDIS_URL gets its own check: /health names it when it hangs.
    app = make_app(tmp_path, tiny_engine, CELERY_BROKER_URL=redis_proc.url, PROBE_INTERVAL_S="0.1",
                   PROBE_TIMEOUT_S="0.3")
    client = app.test_client()
    wait_until(lambda: client.get("/health").get_json()["systems"].get("broker", {}).get("ok"), 3, what="broker up")
    assert "redis" not in client.get("/health").get_json()["systems"]  # no REDIS_URL: no limiter Redis
    with redis_proc.frozen():
        wait_until(lambda: "broker" in client.get("/health").get_json()["down"], 3, what="broker down")
        started = time.monotonic()
        health = client.get("/health")
        # Under the probe's own timeout: read from the prober's verdicts, never a call to the broker.
        assert time.monotonic() - started < 0.3
        assert health.status_code == 503 and health.get_json()["systems"]["broker"]["ok"] is False
    wait_until(lambda: client.get("/health").get_json()["systems"]["broker"]["ok"], 3, what="broker back")


# -- the reconciler ------------------------------------------------------------------------------------------
def test_reconcile_command_removes_old_orphans_and_reports_rows_without_object(tmp_path, tiny_engine):
    app = make_app(tmp_path, tiny_engine)
    client = app.test_client()
    body, content_type = multipart_body([("file", ("a.png", image_bytes(seed=3)))])
    kept = client.post("/predict", data=body, content_type=content_type).get_json()
    body, content_type = multipart_body([("file", ("b.png", image_bytes(seed=4)))])
    lost = client.post("/predict", data=body, content_type=content_type).get_json()
    svc = app.extensions["d3"]
    bucket = svc.settings.bucket_results
    with svc.db.session() as session:
        lost_key = session.get(Prediction, uuid.UUID(lost["id"])).result_object
        kept_key = session.get(Prediction, uuid.UUID(kept["id"])).result_object
    svc.store.delete(bucket, lost_key)  # a row whose object is gone
    orphan = f"2026/01/01/{uuid.uuid4()}.json"
    svc.store.put_bytes(bucket, orphan, b"{}", "application/json")  # an object without a row
    from click.testing import CliRunner

    from api.cli import cli

    env = {"INSTANCE_DIR": str(tmp_path / "instance"), "AUTH_REQUIRED": "false", "RECONCILE_GRACE_S": "3600",
           "SECRET_KEY": "", "DATABASE_URL": "", "MINIO_ENDPOINT": ""}
    runner = CliRunner()
    young = runner.invoke(cli, ["store", "reconcile"], env=env)
    assert '"removed": 0' in young.output and '"kept_young": 1' in young.output, young.output
    result = runner.invoke(cli, ["store", "reconcile", "--grace-s", "0"], env=env)
    assert result.exit_code == 1, result.output  # a row lost its object
    assert '"removed": 1' in result.output and f"{bucket}/{orphan}" in result.output
    assert lost["id"] in result.output and '"rows_without_object": 1' in result.output
    assert not svc.store.exists(bucket, orphan) and svc.store.exists(bucket, kept_key)
    with svc.db.session() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 2  # rows are never removed
