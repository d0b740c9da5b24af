"""Shared fixtures: real servers (PostgreSQL, an S3-protocol server, Redis), the tiny model, apps.

Nothing here is mocked: PostgreSQL is a throwaway cluster from Debian's binaries, the object store
is moto's S3 server over HTTP (what the `minio` SDK talks to), Redis is a real redis-server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import TINY_DETECTORS, TINY_MODEL, free_port, make_app, wait_for_port
from tests.servers import PostgresServer, S3Server

# Keep every test away from a developer's own .env and environment.
for _name in list(os.environ):
    if _name.startswith(("D3_", "MINIO_")) or _name in {"DATABASE_URL", "REDIS_URL", "AUTH_REQUIRED", "BIND"}:
        os.environ.pop(_name)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- PostgreSQL -------------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, migrated database on the throwaway cluster."""
    from api.database import upgrade_schema

    url = postgres_server.create_database()
    upgrade_schema(url)
    return url


# -- S3 (moto server over HTTP) ----------------------------------------------
@pytest.fixture(scope="session")
def s3_server_process() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3_server(s3_server_process: S3Server) -> dict[str, str]:
    """Connection settings for the S3 server, with bucket names unique to the test."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "endpoint": s3_server_process.endpoint,
        "access_key": "test-access",
        "secret_key": "test-secret-key",
        "settings": {
            "MINIO_ENDPOINT": s3_server_process.endpoint, "MINIO_ACCESS_KEY": "test-access",
            "MINIO_SECRET_KEY": "test-secret-key", "MINIO_SECURE": "false",
            "BUCKET_RESULTS": f"res-{suffix}", "BUCKET_VIDEOS": f"vid-{suffix}", "BUCKET_FRAMES": f"frm-{suffix}",
        },
    }


# -- Redis --------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found: run scripts/install-test-deps.sh (make test does)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    wait_for_port(port)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(10)


# -- the model and apps -----------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_engine():
    """One started tiny-model engine shared by every app in the session (loading once is enough)."""
    from api.config import load_settings
    from api.detector import DetectorConfig, InferenceEngine

    engine = InferenceEngine(DetectorConfig.from_settings(load_settings(TINY_MODEL)))
    engine.start()
    assert engine.wait_ready(120), engine.load_error
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def tiny_detectors():
    """The speech and text detectors on their tiny random models, loaded once for the session."""
    from api.config import load_settings
    from api.detector.registry import DetectorRegistry

    registry = DetectorRegistry.from_settings(load_settings({**TINY_MODEL, **TINY_DETECTORS}))
    registry.start(background=False)
    for modality, state in registry.describe().items():
        assert state["status"] == "ready", (modality, state)
    return registry


@pytest.fixture
def app(tmp_path, tiny_engine):
    """The app on its embedded defaults: SQLite and a local-folder object store."""
    return make_app(tmp_path, tiny_engine)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(params=["embedded", "postgres", "s3"])
def backend_app(request, tmp_path, tiny_engine):
    """The same app three ways: embedded defaults, real PostgreSQL, real S3-protocol server."""
    overrides: dict[str, str] = {}
    if request.param == "postgres":
        overrides["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    elif request.param == "s3":
        overrides.update(request.getfixturevalue("s3_server")["settings"])
    application = make_app(tmp_path, tiny_engine, **overrides)
    application.config["BACKEND"] = request.param
    return application


# -- the inference tier (Triton through PyTriton) ---------------------------------
@pytest.fixture(scope="session")
def triton_tier_process():
    """One real `d3 serve-inference` on the tiny model for the session (see tests/triton_tier.py).

    A 10 ms batching window, so requests from several API workers meet in one batch, and a short
    queue (8 requests), so a test can fill it."""
    from tests.triton_tier import TritonTier

    tier = TritonTier(TINY_MODEL, D3_TRITON_MAX_QUEUE_DELAY_MICROSECONDS="10000", D3_TRITON_MAX_QUEUE_SIZE="8")
    tier.start()
    yield tier
    tier.destroy()


@pytest.fixture
def triton_tier(triton_tier_process):
    """The session's tier, running and ready (a test before may have killed or frozen it)."""
    triton_tier_process.ensure_running()
    return triton_tier_process
