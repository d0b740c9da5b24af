"""Per-client isolation: every read endpoint shows a client only its own records; admins see all.

Two clients (alice, bob) and an admin share one service. Zero leaks means: no id, sha256,
filename or result link of one client appears in anything the other receives, under any filter,
page, cursor or statistic; another client's id answers exactly like an id that does not exist.
"""

from __future__ import annotations

import io
import json
import re
import uuid

import pytest

from tests.helpers import image_bytes
from tests.security_helpers import bearer, new_key, post_image, secure_app, video_bytes


@pytest.fixture
def world(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT="10000/minute")
    client = app.test_client()
    keys = {name: new_key(app, name) for name in ("alice", "bob")}
    keys["admin"] = new_key(app, "ops", admin=True)
    made: dict[str, list[dict]] = {"alice": [], "bob": []}

    def upload(owner: str, seed: int, threshold: str, filename: str) -> dict:
        response = post_image(client, image_bytes(seed=seed), filename, bearer(keys[owner]), threshold=threshold)
        assert response.status_code == 200, response.get_json()
        made[owner].append(response.get_json())
        return response.get_json()

    upload("alice", 101, "0.0", "alice-holiday.png")  # fake: p > 0
    upload("alice", 102, "1.0", "alice-cat.png")  # real: p <= 1
    batch = client.post("/predict/batch", headers=bearer(keys["alice"]), content_type="multipart/form-data",
                        data={"files": [(io.BytesIO(image_bytes(seed=s)), f"alice-batch-{s}.png") for s in (103, 104)]})
    made["alice"].extend(r for r in batch.get_json()["results"])
    upload("bob", 201, "0.0", "bob-secret-plans.png")
    upload("bob", 202, "1.0", "bob-passport.png")
    # Bob sends alice's exact bytes at her threshold: he must get his own record, never hers.
    twin = upload("bob", 101, "0.0", "bob-copy.png")
    assert twin["reused"] is False and twin["id"] != made["alice"][0]["id"]
    assert twin["sha256"] == made["alice"][0]["sha256"]

    if "video" in app.blueprints:  # the video route, once it exists: bob owns one video too
        response = client.post("/predict/video", headers=bearer(keys["bob"]), content_type="multipart/form-data",
                               data={"file": (io.BytesIO(video_bytes()), "bob-clip.avi"), "frames": "4"})
        assert response.status_code in (200, 202), response.get_json()
        made["bob"].append(response.get_json())
    return app, client, keys, made


def _ids(rows) -> set[str]:
    return {r["id"] for r in rows}


def _leaks(text: str, other: list[dict], allowed_sha: set[str] = frozenset()) -> list[str]:
    found = []
    for record in other:
        for field in ("id", "filename", "result_url", "timeline_url", "status_url"):
            value = record.get(field)
            if value and value in text:
                found.append(f"{field}={value}")
        if record["sha256"] not in allowed_sha and record["sha256"] in text:
            found.append(f"sha256={record['sha256']}")
    return found


def _list_all(client, headers, **params) -> tuple[list[dict], list[str]]:
    """Every page of a listing by cursor; returns the rows and the raw bodies."""
    rows, bodies, cursor = [], [], None
    while True:
        query = {**params, "limit": "1", **({"cursor": cursor} if cursor else {})}
        response = client.get("/predictions", query_string=query, headers=headers)
        assert response.status_code == 200, response.get_json()
        bodies.append(response.get_data(as_text=True))
        body = response.get_json()
        rows.extend(body["results"])
        cursor = body["next_cursor"]
        if not cursor:
            return rows, bodies


FILTERS = [
    {},
    {"prediction": "fake"}, {"prediction": "real"},
    {"media_type": "image"}, {"media_type": "video"},
    {"status": "done"}, {"status": "queued"}, {"status": "running"}, {"status": "failed"},
    {"since": "2000-01-01T00:00:00Z"}, {"until": "2999-01-01T00:00:00Z"},
    {"since": "2000-01-01", "until": "2999-12-31"},
    {"min_probability": "0"}, {"max_probability": "1"}, {"min_probability": "0", "max_probability": "1"},
    {"filename": "bob"}, {"filename": "alice"}, {"filename": "png"}, {"filename": "%"}, {"filename": "_"},
]


def _expected(records: list[dict], query: dict) -> set[str]:
    def keep(r: dict) -> bool:
        if "prediction" in query and r.get("prediction") != query["prediction"]:
            return False
        if "media_type" in query and r["media_type"] != query["media_type"]:
            return False
        if "status" in query and r["status"] != query["status"]:
            return False
        if ("min_probability" in query or "max_probability" in query) and r.get("fake_probability") is None:
            return False
        return "filename" not in query or query["filename"].lower() in (r.get("filename") or "").lower()

    return {r["id"] for r in records if keep(r)}


@pytest.mark.parametrize("me,other", [("alice", "bob"), ("bob", "alice")])
def test_listing_with_every_filter_shows_only_own_records(world, me, other):
    app, client, keys, made = world
    headers = bearer(keys[me])
    shared_sha = {r["sha256"] for r in made[me]}  # bob's twin upload has alice's sha: it is his own too
    extra = [{"sha256": r["sha256"]} for r in made[me] + made[other]]
    for query in FILTERS + extra:
        rows, bodies = _list_all(client, headers, **query)
        expected = _expected(made[me], query)
        if "sha256" in query:
            expected = {r["id"] for r in made[me] if r["sha256"] == query["sha256"]}
        assert _ids(rows) == expected, query
        for text in bodies:
            assert not _leaks(text, made[other], shared_sha), (query, _leaks(text, made[other], shared_sha))
        # Offset paging and the page totals agree.
        page = client.get("/predictions", query_string={**query, "limit": "500", "offset": "0"}, headers=headers)
        assert page.get_json()["total"] == len(expected)
        assert _ids(page.get_json()["results"]) == expected
        assert not client.get("/predictions", query_string={**query, "offset": str(len(expected))},
                              headers=headers).get_json()["results"]


def _not_found_shape(response, prediction_id: str) -> tuple:
    body = json.loads(response.get_data(as_text=True).replace(prediction_id, "<id>"))
    headers = {k: v for k, v in response.headers.items() if k not in ("X-Request-ID",)}
    return response.status_code, body, headers


def test_another_clients_id_is_404_exactly_like_a_missing_one(world):
    app, client, keys, made = world
    for me, other in (("alice", "bob"), ("bob", "alice")):
        headers = bearer(keys[me])
        for record in made[other]:
            theirs = client.get(f"/predictions/{record['id']}", headers=headers)
            missing_id = str(uuid.uuid4())
            missing = client.get(f"/predictions/{missing_id}", headers=headers)
            assert theirs.status_code == 404
            assert _not_found_shape(theirs, record["id"]) == _not_found_shape(missing, missing_id)
            assert not _leaks(theirs.get_data(as_text=True).replace(record["id"], ""), [record])
        for record in made[me]:
            own = client.get(f"/predictions/{record['id']}", headers=headers)
            assert own.status_code == 200 and own.get_json()["id"] == record["id"]


def test_stats_count_only_own_records(world):
    app, client, keys, made = world
    for me in ("alice", "bob"):
        stats = client.get("/predictions/stats", headers=bearer(keys[me])).get_json()
        mine = made[me]
        assert stats["total"] == len(mine)
        assert stats["by_prediction"]["fake"] == sum(r.get("prediction") == "fake" and r["status"] == "done"
                                                     for r in mine)
        assert stats["by_media_type"]["image"] == sum(r["media_type"] == "image" for r in mine)
        assert sum(day["count"] for day in stats["per_day"]) == len(mine)
        probabilities = [r["fake_probability"] for r in mine if r.get("fake_probability") is not None
                         and r["status"] == "done"]
        assert stats["mean_fake_probability"] == pytest.approx(sum(probabilities) / len(probabilities))
        ranged = client.get("/predictions/stats", headers=bearer(keys[me]),
                            query_string={"since": "2000-01-01", "until": "2999-01-01"}).get_json()
        assert ranged["total"] == len(mine)


def test_result_urls_are_given_only_to_their_owner(world):
    app, client, keys, made = world
    for me, other in (("alice", "bob"), ("bob", "alice")):
        headers = bearer(keys[me])
        seen = client.get("/predictions", query_string={"limit": "500"}, headers=headers).get_data(as_text=True)
        seen += client.get("/predictions/stats", headers=headers).get_data(as_text=True)
        foreign_objects = {re.search(r"/objects/([^?]+)", r["result_url"]).group(1)
                           for r in made[other] if r.get("result_url")}
        assert foreign_objects and not any(obj in seen for obj in foreign_objects)
        for record in made[me]:
            if not record.get("result_url"):
                continue
            fresh = client.get(f"/predictions/{record['id']}", headers=headers).get_json()["result_url"]
            document = client.get(fresh.replace("http://localhost", ""))
            assert document.status_code == 200 and document.get_json()["id"] == record["id"]


def test_timeline_is_owner_scoped_once_it_exists(world):
    app, client, keys, made = world
    rule = next((r for r in app.url_map.iter_rules() if r.rule.endswith("/timeline.png")), None)
    videos = [r for r in made["bob"] if r["media_type"] == "video"]
    if rule is None or not videos:
        pytest.skip("the video timeline route has not landed in this tree yet")
    video_id = videos[0]["id"]
    path = rule.rule.replace("<prediction_id>", video_id)
    missing_id = str(uuid.uuid4())
    theirs = client.get(path, headers=bearer(keys["alice"]))
    missing = client.get(rule.rule.replace("<prediction_id>", missing_id), headers=bearer(keys["alice"]))
    assert theirs.status_code == 404
    assert _not_found_shape(theirs, video_id) == _not_found_shape(missing, missing_id)
    assert client.get(path, headers=bearer(keys["bob"])).status_code == 200
    assert client.get(path, headers=bearer(keys["admin"])).status_code == 200


def test_admin_sees_every_clients_records(world):
    app, client, keys, made = world
    everyone = made["alice"] + made["bob"]
    headers = bearer(keys["admin"])
    rows, _ = _list_all(client, headers)
    assert _ids(rows) == _ids(everyone)
    for record in everyone:
        assert client.get(f"/predictions/{record['id']}", headers=headers).status_code == 200
    assert client.get("/predictions/stats", headers=headers).get_json()["total"] == len(everyone)
    twins = client.get("/predictions", query_string={"sha256": made["alice"][0]["sha256"]}, headers=headers)
    assert twins.get_json()["total"] == 2  # alice's original and bob's own copy
    # The admin's own uploads are its own: they do not show up for alice.
    mine = post_image(client, image_bytes(seed=301), "ops.png", headers).get_json()
    assert mine["id"] not in _ids(_list_all(client, bearer(keys["alice"]))[0])
