"""Rate limits: per key, per client IP without one, stricter for video, 429 JSON with Retry-After,
reset after the window; in memory and in a real Redis shared by two app instances."""

from __future__ import annotations

import io
import time

import pytest
import redis
from flask import Blueprint, jsonify

from tests.helpers import free_port, make_app
from tests.security_helpers import bearer, new_key, secure_app, video_bytes

WINDOW_S = 3


def _hit(client, n: int, path: str = "/predictions", method: str = "GET", **kwargs) -> list:
    return [client.open(path, method=method, **kwargs) for _ in range(n)]


def _assert_limited(response) -> int:
    assert response.status_code == 429
    body = response.get_json()
    assert body["error"]["code"] == "rate_limited" and "retry after" in body["error"]["message"]
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= WINDOW_S + 1
    return retry_after


def test_per_key_limit_hits_and_resets(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT=f"3 per {WINDOW_S} seconds")
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    client = app.test_client()
    assert [r.status_code for r in _hit(client, 3, headers=bearer(alice))] == [200, 200, 200]
    retry_after = _assert_limited(client.get("/predictions", headers=bearer(alice)))
    assert client.get("/predictions/stats", headers=bearer(alice)).status_code == 429  # one budget per key
    assert client.get("/predictions", headers=bearer(bob)).status_code == 200  # bob has his own budget
    # Never limited: health, metrics; refused requests do not spend anyone's budget.
    assert {r.status_code for r in _hit(client, 10, "/health", headers=bearer(alice))} == {200}
    assert {r.status_code for r in _hit(client, 5, "/metrics")} == {200}
    assert {r.status_code for r in _hit(client, 5, headers=bearer("d3_bad"))} == {401}
    time.sleep(retry_after + 0.2)
    assert client.get("/predictions", headers=bearer(alice)).status_code == 200


def test_anonymous_callers_are_limited_per_client_ip_behind_one_proxy(tmp_path, tiny_engine):
    app = make_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT=f"2 per {WINDOW_S} seconds")  # auth off: anonymous
    client = app.test_client()

    def via_proxy(forwarded_for: str):
        return client.get("/predictions", headers={"X-Forwarded-For": forwarded_for})

    assert [via_proxy("198.51.100.7").status_code for _ in range(2)] == [200, 200]
    _assert_limited(via_proxy("198.51.100.7"))
    # Only the last hop (the one nginx adds) is trusted: a forged first entry changes nothing.
    _assert_limited(via_proxy("203.0.113.99, 198.51.100.7"))
    assert via_proxy("198.51.100.8").status_code == 200  # another client
    assert client.get("/predictions").status_code == 200  # direct, from 127.0.0.1


def _video_endpoint(app):
    """The real video upload route when it exists; before it lands, a stand-in `video` blueprint
    (the limits select the video budget by blueprint name, so the rule is exercised either way)."""
    if "video" in app.blueprints:
        return "/predict/video"
    stand_in = Blueprint("video", __name__)
    stand_in.add_url_rule("/predict/video", "predict_video", lambda: jsonify({"ok": True}), methods=["POST"])
    app.register_blueprint(stand_in)
    return "/predict/video"


def test_video_uploads_have_a_stricter_separate_budget(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT="50/minute", RATE_LIMIT_VIDEO="2/minute")
    path = _video_endpoint(app)
    key = new_key(app, "alice")
    client = app.test_client()
    first = _hit(client, 2, path, "POST", headers=bearer(key))
    assert all(r.status_code != 429 for r in first)
    limited = client.post(path, headers=bearer(key))
    assert limited.status_code == 429 and "2 per 1 minute" in limited.get_json()["error"]["message"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    # Other routes still have budget; every video attempt also spends one of the default 50.
    responses = _hit(client, 47, headers=bearer(key))
    assert {r.status_code for r in responses} == {200}
    assert client.get("/predictions", headers=bearer(key)).status_code == 429
    assert client.post(path, headers=bearer(new_key(app, "bob"))).status_code != 429


def test_limits_in_redis_are_shared_by_two_app_instances(tmp_path, tiny_engine, redis_url):
    settings = {"RATE_LIMIT_DEFAULT": f"4 per {WINDOW_S} seconds", "REDIS_URL": redis_url}
    first = secure_app(tmp_path, tiny_engine, **settings)
    second = secure_app(tmp_path, tiny_engine, **settings)  # same database and keys, another "worker"
    key = new_key(first, "alice")
    one, two = first.test_client(), second.test_client()
    assert [c.get("/predictions", headers=bearer(key)).status_code for c in (one, two, one, two)] == [200] * 4
    retry_after = _assert_limited(two.get("/predictions", headers=bearer(key)))
    _assert_limited(one.get("/predictions", headers=bearer(key)))
    stored = redis.Redis.from_url(redis_url).keys(f"*{key.split('_')[1]}*")
    assert stored, "the counter lives in Redis"
    assert not any(key.encode() in k for k in stored)  # the bucket is named by key id, never the key
    time.sleep(retry_after + 0.2)
    assert one.get("/predictions", headers=bearer(key)).status_code == 200
    assert two.get("/predictions", headers=bearer(key)).status_code == 200


def test_an_unreachable_redis_falls_back_to_per_process_limits(tmp_path, tiny_engine):
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = secure_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT=f"2 per {WINDOW_S} seconds", REDIS_URL=dead)
    key = new_key(app, "alice")
    client = app.test_client()
    assert [r.status_code for r in _hit(client, 2, headers=bearer(key))] == [200, 200]
    assert client.get("/predictions", headers=bearer(key)).status_code == 429


@pytest.mark.parametrize("value", ["", "often", "10/fortnight"])
def test_bad_rate_settings_are_refused_by_name(tmp_path, tiny_engine, value):
    from api.config import ConfigError

    if value == "":
        # Empty means "the default", as for every setting.
        assert make_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT=value)
        return
    with pytest.raises(ConfigError, match="RATE_LIMIT_DEFAULT"):
        make_app(tmp_path, tiny_engine, RATE_LIMIT_DEFAULT=value)


def test_video_jobs_are_limited_per_key(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, VIDEO_JOBS_PER_KEY="1", RATE_LIMIT_VIDEO="1000/minute")
    app.extensions["d3"].video_jobs.stop()  # jobs stay queued, as behind a long video
    alice, bob = new_key(app, "alice"), new_key(app, "bob")
    client = app.test_client()
    clip = video_bytes()

    def submit(key: str):
        return client.post("/predict/video", headers=bearer(key), content_type="multipart/form-data",
                           data={"file": (io.BytesIO(clip), "clip.avi"), "async": "true"})

    assert submit(alice).status_code == 202
    refused = submit(alice)
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "too_many_jobs"
    assert submit(bob).status_code == 202  # bob's jobs are counted on his own key
