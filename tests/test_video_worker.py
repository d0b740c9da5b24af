"""The worker tier for real: a redis-server, `d3 worker` processes (Celery), PostgreSQL, the API app.

Each test starts what it needs and removes it; settings are short (heartbeat 0.3 s, stale after
4 s, visibility timeout 4 s) so that losing a worker costs seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from api.models import Prediction
from tests.conftest import ROOT, TINY_MODEL, free_port, image_bytes, make_app, wait_for_port
from tests.video_clips import VIDEO_APP_SETTINGS, clip_bytes, post_video

WAIT_S = 120.0  # a worker process imports torch and builds the tiny model first: generous on 2 busy cores


class RedisServer:
    """A redis-server of this test's own, so the test may stop it (and start it again on the same port)."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server not found: run scripts/install-test-deps.sh (make test does)")
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


class Worker:
    """`d3 worker` (python -m api.cli worker) in a session of its own, its output in a log file."""

    def __init__(self, settings: dict[str, str], log: Path) -> None:
        env = {name: value for name, value in os.environ.items() if not name.startswith(("D3_", "MINIO_"))}
        env.update(settings, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "api.cli", "worker"], cwd=ROOT, env=env,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def token_prefix(self) -> str:
        return f"{socket.gethostname()}:{self.process.pid}:"

    def kill9(self) -> None:
        """kill -9 of the worker process itself (its decoder children see their pipe close and exit)."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def close(self) -> None:
        # The worker and anything left of its session (a graceful stop is not under test here).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def tier(tmp_path, postgres_url, redis_server, tiny_engine):
    """Settings shared by the API app and its workers, the app itself, and a way to start workers."""
    settings = {**TINY_MODEL, **VIDEO_APP_SETTINGS, "DATABASE_URL": postgres_url,
                "CELERY_BROKER_URL": redis_server.url, "INSTANCE_DIR": str(tmp_path / "instance"),
                "SECRET_KEY": "worker-tests-" + uuid.uuid4().hex, "AUTH_REQUIRED": "false",
                "JOB_HEARTBEAT_S": "0.3", "JOB_STALE_AFTER_S": "4", "CELERY_VISIBILITY_TIMEOUT_S": "4",
                "VIDEO_WORKERS": "1", "LOG_LEVEL": "INFO"}
    workers: list[Worker] = []

    class Tier:
        app = make_app(tmp_path, tiny_engine, **settings)
        redis = redis_server

        @staticmethod
        def worker(**overrides: str) -> Worker:
            worker = Worker({**settings, **overrides}, tmp_path / f"worker-{len(workers)}.log")
            workers.append(worker)
            return worker

    yield Tier
    for worker in workers:
        worker.close()
    Tier.app.extensions["d3"].video_jobs.stop()


def services(app):
    return app.extensions["d3"]


def wait_for(client, job_id: str, statuses=("done", "failed"), timeout: float = WAIT_S, workers=()) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/predictions/{job_id}").get_json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    logs = "\n".join(worker.output() for worker in workers)
    raise AssertionError(f"job {job_id} still {body['status']} after {timeout} s; worker output:\n{logs}")


def metrics(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True))
            for sample in family.samples}


def clip(tmp_path, count: int = 40, size=(64, 48), name: str = "clip") -> bytes:
    levels = [40 + (i * 37) % 200 for i in range(count)]
    return clip_bytes(tmp_path, "MJPG", 10, levels, size=size, name=name)


def stored_objects(app) -> dict[str, int]:
    s = services(app)
    root = s.settings.resolved_object_store_dir
    return {bucket: sum(1 for path in (root / bucket).rglob("*") if path.is_file())
            for bucket in (s.settings.bucket_videos, s.settings.bucket_frames, s.settings.bucket_results)}


def job_rows(app) -> int:
    with services(app).db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Prediction)))


# ---------------------------------------------------------------------------------------------------------------
def test_an_async_job_runs_on_a_worker_with_the_sync_result_and_the_queue_is_measured(tmp_path, tier):
    client = tier.app.test_client()
    data = clip(tmp_path)
    sync = post_video(client, data, frames="8", aggregation="vote", threshold="0.5")
    assert sync.status_code == 200
    sync = sync.get_json()
    response = post_video(client, data, frames="8", aggregation="vote", threshold="0.5", **{"async": "true"})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    time.sleep(0.2)
    before = metrics(client)  # no worker yet: the job waits, and the queue says so
    assert before[("d3_video_queue_length", ())] == 1
    assert before[("d3_video_queue_oldest_age_seconds", ())] > 0
    assert before[("d3_video_jobs", (("status", "queued"),))] == 1

    worker = tier.worker()
    done = wait_for(client, job_id, workers=[worker])
    assert done["status"] == "done", done
    assert done["progress"] == {"done": 8, "total": 8} and done["frames_analyzed"] == 8
    for key in ("prediction", "aggregation", "frames_analyzed", "duration_s", "fps", "width", "height", "threshold",
                "model_version", "sha256", "segments"):
        assert done[key] == sync[key], key
    assert done["fake_probability"] == pytest.approx(sync["fake_probability"], abs=1e-5)
    assert [f["index"] for f in done["frames"]] == [f["index"] for f in sync["frames"]]
    assert [f["fake_probability"] for f in done["frames"]] == pytest.approx(
        [f["fake_probability"] for f in sync["frames"]], abs=1e-5)
    row = services(tier.app).queries.get(job_id, None, True)
    assert row.video.worker.startswith(worker.token_prefix) and row.video.attempts == 1
    assert row.video.upload_object is None
    assert services(tier.app).store.get_bytes(services(tier.app).settings.bucket_videos, row.media_object) == data
    assert client.get(f"/predictions/{job_id}/timeline.png").status_code == 200
    after = metrics(client)
    assert after[("d3_video_queue_length", ())] == 0 and after[("d3_video_queue_oldest_age_seconds", ())] == 0
    assert after[("d3_video_jobs", (("status", "done"),))] == 2  # the sync one and the job


def test_a_worker_killed_mid_job_is_replaced_and_the_job_is_done_once(tmp_path, tier):
    client = tier.app.test_client()
    # The first worker waits 250 ms for every batch of 8 frames, so the job is still running when it dies.
    slow = tier.worker(D3_MAX_WAIT_MS="250")
    job_id = post_video(client, clip(tmp_path, 32), frames="32", **{"async": "true"}).get_json()["id"]
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        body = client.get(f"/predictions/{job_id}").get_json()
        if body["status"] == "running" and body["progress"]["done"] >= 8:
            break
        assert body["status"] in ("queued", "running"), body
        time.sleep(0.02)
    else:
        raise AssertionError(f"the job never got going: {body}\n{slow.output()}")
    slow.kill9()
    row = services(tier.app).queries.get(job_id, None, True)
    assert row.status == "running" and row.video.worker.startswith(slow.token_prefix)  # killed mid-job

    fresh = tier.worker()
    done = wait_for(client, job_id, workers=[fresh])
    assert done["status"] == "done", done
    assert done["frames_analyzed"] == 32 and done["progress"] == {"done": 32, "total": 32}
    time.sleep(6)  # the killed worker's unacknowledged message comes back too (visibility 4 s): a no-op
    row = services(tier.app).queries.get(job_id, None, True)
    assert row.status == "done" and row.video.attempts == 2 and row.video.requeued == 1
    assert row.video.worker.startswith(fresh.token_prefix)
    assert job_rows(tier.app) == 1
    s = services(tier.app)
    assert stored_objects(tier.app) == {s.settings.bucket_videos: 1, s.settings.bucket_frames: 1,
                                        s.settings.bucket_results: 2}  # video, frames, summary + timeline
    stats = s.jobs.stats()
    assert stats.counts["running"] == 0 and stats.queued == 0


def test_with_redis_down_async_is_503_and_sync_keeps_working(tmp_path, tier):
    client = tier.app.test_client()
    data = clip(tmp_path, 12)
    tier.redis.stop()
    started = time.monotonic()
    response = post_video(client, data, frames="4", **{"async": "true"})
    took = time.monotonic() - started
    assert response.status_code == 503, response.get_json()
    assert int(response.headers["Retry-After"]) > 0
    assert response.get_json()["error"]["code"] == "unavailable"
    assert "queue" in response.get_json()["error"]["message"]
    assert took < 30, f"the refusal took {took:.1f} s"  # bounded: no hang on a dead broker
    assert job_rows(tier.app) == 0 and stored_objects(tier.app)[services(tier.app).settings.bucket_videos] == 0
    sync = post_video(client, data, frames="4")
    assert sync.status_code == 200 and sync.get_json()["status"] == "done"
    image = client.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=3)), "x.png")},
                        content_type="multipart/form-data")
    assert image.status_code == 200
    tier.redis.start()  # the broker is back: jobs are accepted again, no restart of the API needed
    response = post_video(client, data, frames="4", **{"async": "true"})
    assert response.status_code == 202, response.get_json()


def test_a_poison_job_fails_after_the_retry_limit_with_its_reason(tmp_path, tier):
    """A video that kills the worker's decoder every time (its memory limit), never a verdict."""
    client = tier.app.test_client()
    worker = tier.worker(VIDEO_DECODE_MEMORY_MB="64", JOB_MAX_ATTEMPTS="2")
    job_id = post_video(client, clip(tmp_path, 12, size=(320, 240)), frames="4", **{"async": "true"}).get_json()["id"]
    failed = wait_for(client, job_id, workers=[worker])
    assert failed["status"] == "failed" and failed["prediction"] is None
    assert failed["error"].startswith("gave up after 2 attempts; the last one: ")
    assert "memory limit of 64 MB" in failed["error"]
    row = services(tier.app).queries.get(job_id, None, True)
    assert row.video.attempts == 2 and row.video.requeued == 1 and row.video.upload_object is None
    assert stored_objects(tier.app)[services(tier.app).settings.bucket_videos] == 0
    assert services(tier.app).jobs.stats().counts["running"] == 0
