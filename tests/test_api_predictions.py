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
    ("prediction", "maybe"), ("media_type", "sound"), ("since", "yesterday"), ("until", "2024-13-01"),
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
    assert body["by_media_type"] == {"image": 9, "video": 3, "audio": 0, "text": 0}
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


# -- cursors carry the listing they continue ---------------------------------------------------------
def test_following_next_cursor_alone_keeps_the_filters_and_page_size(seeded):
    """A new user followed next_cursor as the README shows: the second page must be the same listing."""
    app, ids, rows = seeded
    client = app.test_client()
    wanted = [ids[i] for i in range(12) if rows[i]["media_type"] == "image"]  # 9 images, newest first
    status, page = get(client, "/predictions", media_type="image", limit=4)
    assert status == 200 and page["total"] == 9
    seen = [r["id"] for r in page["results"]]
    while page["next_cursor"]:
        status, page = get(client, "/predictions", cursor=page["next_cursor"])  # the cursor alone
        assert status == 200
        assert page["limit"] == 4 and page["count"] <= 4 and page["total"] == 9
        assert all(r["media_type"] == "image" for r in page["results"])
        seen += [r["id"] for r in page["results"]]
    assert seen == wanted


def test_a_cursor_refuses_a_request_that_changes_its_listing(seeded):
    app, ids, _ = seeded
    client = app.test_client()
    _, first = get(client, "/predictions", prediction="real", limit=2, since=(NOW - timedelta(days=3)).isoformat())
    cursor = first["next_cursor"]
    # Repeating the same filters and size is fine ...
    status, same = get(client, "/predictions", cursor=cursor, prediction="real", limit=2)
    assert status == 200 and same["limit"] == 2 and all(r["prediction"] == "real" for r in same["results"])
    # ... changing one is refused, naming it, rather than silently mixing two listings.
    for param, value in (("prediction", "fake"), ("limit", "3"), ("media_type", "video"),
                         ("since", (NOW - timedelta(days=1)).isoformat())):
        status, body = get(client, "/predictions", cursor=cursor, **{param: value})
        assert status == 400, (param, body)
        assert body["error"]["parameter"] == param and "cursor" in body["error"]["message"]


def test_nul_bytes_and_dates_past_the_calendar_are_400s_on_every_backend(seeded):
    app, _, _ = seeded
    client = app.test_client()
    for params, parameter in [({"filename": "a\x00"}, "filename"), ({"since": "9999-12-31T23:00:00-05:00"}, "since"),
                              ({"until": "0001-01-01T00:00:00+05:00"}, "until")]:
        for path in ("/predictions", "/predictions/stats"):
            if path.endswith("stats") and parameter == "filename":
                continue
            status, body = get(client, path, **params)
            assert status == 400 and body["error"]["parameter"] == parameter, (path, params, body)
    status, body = get(client, "/predictions/stats", until="0001-01-05")
    assert status == 200 and body["total"] == 0


def test_cursor_encoding_round_trip_and_tampering():
    import base64
    import json

    from api.exceptions import InvalidInput
    from api.services.queries import Filters, decode_cursor, encode_cursor

    created = datetime(2026, 11, 5, 12, 30, 1, 123456, tzinfo=timezone.utc)
    row = Prediction(id=uuid.uuid4(), created_at=created)
    filters = Filters(prediction="fake", media_type="image", since=datetime(2026, 11, 1, tzinfo=timezone.utc),
                      min_probability=0.25, sha256="a" * 64, filename="100%_real")
    cursor = decode_cursor(encode_cursor(row, filters, 7))
    assert (cursor.created, cursor.last_id, cursor.filters, cursor.limit) == (created, row.id, filters, 7)
    naive = Prediction(id=uuid.uuid4(), created_at=created.replace(tzinfo=None))  # SQLite hands back naive UTC
    assert decode_cursor(encode_cursor(naive, Filters(), 50)).created == created
    token = encode_cursor(row, Filters(), 50)
    assert "=" not in token and "+" not in token and "/" not in token  # safe in a query string as it is

    def forged(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    after = [created.replace(tzinfo=None).isoformat(), str(row.id)]
    for bad in (forged({"after": after, "limit": 10_000, "filters": {}}),  # over MAX_LIMIT
                forged({"after": after, "limit": True, "filters": {}}),  # a boolean is not a page size
                forged({"after": after, "limit": 5, "filters": {"filename": "a\x00b"}}),  # PostgreSQL: no NUL
                forged({"after": after, "limit": 5, "filters": {"prediction": "maybe"}}),  # a refused value
                forged({"after": after, "limit": 5, "filters": {"owner": "someone-else"}}),  # not a filter
                forged({"after": after, "limit": 5}),
                forged(after),  # the old two-element cursor
                token[:-3], "", "!!"):
        with pytest.raises(InvalidInput) as caught:
            decode_cursor(bad)
        assert caught.value.details["parameter"] == "cursor"
