"""GET /predictions (filters, pagination), /predictions/<id>, /predictions/stats, on all backends."""

from __future__ import annotations

import io
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from api.models import Prediction
from tests.helpers import image_bytes


def seed_rows(app, rows: list[dict]) -> list[str]:
    """Insert predictions directly (known times and scores) to test the read side exactly."""
    svc = app.extensions["d3"]
    ids = []
    with svc.db.session() as session:
        for spec in rows:
            row = Prediction(id=uuid.uuid4(), media_type=spec.get("media_type", "image"),
                             filename=spec.get("filename", "f.png"), sha256=spec.get("sha256", "0" * 64),
                             size_bytes=10, prediction=spec.get("prediction", "real"),
                             fake_probability=spec.get("p", 0.1), confidence=0.9, threshold=0.5,
                             model_version="test", processing_ms=spec.get("ms", 10.0), status="done",
                             created_at=spec["at"], owner=spec.get("owner"))
            session.add(row)
            ids.append(str(row.id))
    return ids


NOW = datetime.now(timezone.utc).replace(microsecond=0)


@pytest.fixture
def seeded(backend_app):
    rows = []
    for i in range(12):
        rows.append({"at": NOW - timedelta(hours=i * 7), "p": i / 12, "prediction": "fake" if i / 12 > 0.5 else "real",
                     "media_type": "video" if i % 4 == 0 else "image", "filename": f"Holiday_{i}%.png",
                     "sha256": f"{i:064x}", "ms": float(i + 1)})
    ids = seed_rows(backend_app, rows)
    return backend_app, ids, rows


def get(client, path, **params):
    response = client.get(path, query_string=params)
    return response.status_code, response.get_json()


def test_list_newest_first_with_total(seeded):
    app, ids, _ = seeded
    status, body = get(app.test_client(), "/predictions")
    assert status == 200
    assert body["total"] == 12 and body["count"] == 12
    assert [r["id"] for r in body["results"]] == ids  # seeded newest first
    assert body["next_cursor"] is None


@pytest.mark.parametrize("params,expected_indexes", [
    ({"prediction": "fake"}, [i for i in range(12) if i / 12 > 0.5]),
    ({"media_type": "video"}, [0, 4, 8]),
    ({"min_probability": "0.5", "max_probability": "0.75"}, [6, 7, 8, 9]),
    ({"sha256": f"{3:064x}"}, [3]),
    ({"filename": "DAY_1"}, [1, 10, 11]),  # case-insensitive substring
    ({"filename": "%"}, list(range(12))),  # a literal %, not a wildcard
    ({"filename": "_1%"}, [1]),  # `_1%.png` only in Holiday_1%.png: _ and % are literal
])
def test_filters(seeded, params, expected_indexes):
    app, ids, _ = seeded
    status, body = get(app.test_client(), "/predictions", **params)
    assert status == 200
    assert [r["id"] for r in body["results"]] == [ids[i] for i in expected_indexes]
    assert body["total"] == len(expected_indexes)


def test_time_range(seeded):
    app, ids, rows = seeded
    since = (rows[5]["at"]).isoformat()
    until = (rows[2]["at"]).isoformat().replace("+00:00", "Z")
    status, body = get(app.test_client(), "/predictions", since=since, until=until)
    assert [r["id"] for r in body["results"]] == ids[2:6]


def test_offset_and_cursor_pages_cover_everything_once(seeded):
    app, ids, _ = seeded
    client = app.test_client()
    _, page = get(client, "/predictions", limit=5, offset=10)
    assert [r["id"] for r in page["results"]] == ids[10:]
    seen, cursor = [], None
    while True:
        params = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        status, page = get(client, "/predictions", **params)
        assert status == 200 and page["total"] == 12
        seen += [r["id"] for r in page["results"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids


@pytest.mark.parametrize("param,value", [
    ("prediction", "maybe"), ("media_type", "audio"), ("since", "yesterday"), ("until", "2024-13-01"),
    ("min_probability", "2"), ("max_probability", "x"), ("sha256", "abc"), ("limit", "0"), ("limit", "501"),
    ("offset", "-1"), ("cursor", "!!not-a-cursor"), ("status", "paused"),
])
def test_bad_filter_values_name_the_parameter(client, param, value):
    status, body = get(client, "/predictions", **{param: value})
    assert status == 400
    assert body["error"]["parameter"] == param


def test_get_one_with_fresh_url_and_404s(client):
    response = client.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=9)), "one.png")},
                           content_type="multipart/form-data")
    created = response.get_json()
    status, body = get(client, f"/predictions/{created['id']}")
    assert status == 200
    assert body["id"] == created["id"] and body["fake_probability"] == created["fake_probability"]
    assert body["result_url"].startswith("http")
    assert get(client, f"/predictions/{uuid.uuid4()}")[0] == 404
    assert get(client, "/predictions/not-a-uuid")[0] == 404


def test_stats(seeded):
    app, _, rows = seeded
    status, body = get(app.test_client(), "/predictions/stats",
                       since=(NOW - timedelta(days=10)).isoformat(), until=NOW.isoformat())
    assert status == 200
    assert body["total"] == 12
    assert body["by_media_type"] == {"image": 9, "video": 3}
    fakes = sum(1 for r in rows if r["prediction"] == "fake")
    assert body["by_prediction"] == {"fake": fakes, "real": 12 - fakes}
    assert sum(day["count"] for day in body["per_day"]) == 12
    assert len(body["per_day"]) >= 3  # 12 rows 7 hours apart span several days
    assert body["mean_fake_probability"] == pytest.approx(sum(r["p"] for r in rows) / 12)
    assert body["processing_ms"]["mean"] == pytest.approx(6.5)
    assert body["processing_ms"]["p95"] == 12.0  # nearest rank of 1..12
    narrow = get(app.test_client(), "/predictions/stats", since=(NOW - timedelta(hours=1)).isoformat())[1]
    assert narrow["total"] == 1
    assert get(app.test_client(), "/predictions/stats", since="bad")[0] == 400
