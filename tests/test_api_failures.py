"""Dependencies failing mid-request: stop the real server, expect 503 + Retry-After and nothing half-written."""

from __future__ import annotations

import io
import logging

import pytest
from sqlalchemy import func, select

from api.models import Prediction
from tests.helpers import image_bytes, make_app


def post(client, seed: int):
    return client.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=seed)), "x.png")},
                       content_type="multipart/form-data")


def count_rows(app) -> int:
    with app.extensions["d3"].db.session() as session:
        return session.scalar(select(func.count()).select_from(Prediction))


def test_object_store_down_gives_503_and_no_row(tmp_path, tiny_engine, s3_server, s3_server_process):
    app = make_app(tmp_path, tiny_engine, **s3_server["settings"])
    client = app.test_client()
    assert post(client, 1).status_code == 200
    s3_server_process.stop()
    try:
        response = post(client, 2)
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert "object store" in response.get_json()["error"]["message"]
        assert count_rows(app) == 1  # only the earlier, complete prediction
        health = client.get("/health")
        assert health.status_code == 503 and health.get_json()["object_store"]["reachable"] is False
    finally:
        s3_server_process.start()
    assert post(client, 3).status_code == 200


def test_database_down_gives_503_and_no_orphan_object(tmp_path, tiny_engine, postgres_url, postgres_server):
    app = make_app(tmp_path, tiny_engine, DATABASE_URL=postgres_url)
    client = app.test_client()
    assert post(client, 1).status_code == 200
    results_dir = app.extensions["d3"].store.root / app.extensions["d3"].settings.bucket_results
    objects_before = sorted(p for p in results_dir.rglob("*.json"))
    postgres_server.stop()
    try:
        response = post(client, 2)
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert "database" in response.get_json()["error"]["message"]
        assert sorted(p for p in results_dir.rglob("*.json")) == objects_before  # the object was removed
        assert client.get("/health").get_json()["database"]["reachable"] is False
        listing = client.get("/predictions")
        assert listing.status_code == 503 and listing.is_json
    finally:
        postgres_server.start()
    assert count_rows(app) == 1
    assert post(client, 3).status_code == 200


def test_unmigrated_database_refuses_to_start(tmp_path, tiny_engine, postgres_server):
    import pytest

    from api import create_app
    from api.database import SchemaNotMigrated
    from tests.helpers import app_settings

    url = postgres_server.create_database()  # empty: never migrated
    with pytest.raises(SchemaNotMigrated, match="d3 db upgrade"):
        create_app(app_settings(tmp_path, DATABASE_URL=url), engine=tiny_engine)


# A real trigger that refuses every insert the way a violated constraint does (an IntegrityError).
REFUSING_TRIGGER = {
    "sqlite": ["CREATE TRIGGER refuse_predictions BEFORE INSERT ON predictions "
               "BEGIN SELECT RAISE(ABORT, 'refused by a test trigger'); END"],
    "postgresql": ["CREATE FUNCTION refuse_row() RETURNS trigger AS $$ BEGIN "
                   "RAISE EXCEPTION 'refused by a test trigger' USING ERRCODE = 'check_violation'; END $$ "
                   "LANGUAGE plpgsql",
                   "CREATE TRIGGER refuse_predictions BEFORE INSERT ON predictions "
                   "FOR EACH ROW EXECUTE FUNCTION refuse_row()"],
}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_integrity_error_is_a_logged_500_not_a_retry(request, tmp_path, tiny_engine, caplog, backend):
    """A refused write that retrying cannot fix is a bug: 500 without Retry-After, logged with its
    cause and the request id, and nothing left half-written."""
    overrides = {"DATABASE_URL": request.getfixturevalue("postgres_url")} if backend == "postgresql" else {}
    app = make_app(tmp_path, tiny_engine, **overrides)
    client = app.test_client()
    with app.extensions["d3"].db.engine.begin() as conn:
        for statement in REFUSING_TRIGGER[backend]:
            conn.exec_driver_sql(statement)
    results_dir = app.extensions["d3"].store.root / app.extensions["d3"].settings.bucket_results
    with caplog.at_level(logging.ERROR):
        response = client.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=4)), "x.png")},
                               content_type="multipart/form-data", headers={"X-Request-ID": "integrity-test-1"})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "Retry-After" not in response.headers
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any(getattr(r, "request_id", None) == "integrity-test-1" and "IntegrityError" in repr(r.exc_info[1])
               for r in logged), [(r.getMessage(), getattr(r, "request_id", None)) for r in logged]
    assert not list(results_dir.rglob("*.json"))  # the object written before the row was removed again
    assert count_rows(app) == 0
