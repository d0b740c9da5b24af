"""Hostile input: a corpus of malformed and hostile files and requests, made here byte by byte.

Each gets a documented 4xx JSON answer (or is handled safely), nothing is stored for it, the
process's memory stays bounded, no other program is ever started (Pillow must never hand a file
to Ghostscript), and the next good request succeeds.
"""

from __future__ import annotations

import io
import sys
import threading
import time
import uuid

import pytest

from tests.helpers import image_bytes, post_form
from tests.security_corpus import hostile_files, many_frame_gif, tiny_mp4, unusual_but_valid, zip_bomb
from tests.security_helpers import bearer, new_key, post_image, reset_peak_rss, rss_mb, secure_app

CODES = {400: "invalid_input", 413: "payload_too_large", 415: "unsupported_media_type", 422: "unprocessable_media"}
MAX_IMAGE_BYTES = 1_000_000
MAX_PIXELS = 4_000_000
# Peak memory the whole corpus may add to the process: decoding is bounded by MAX_PIXELS
# (4 Mpx x 4 bytes = 16 MB per image), the rest is Python and allocator noise.
PEAK_GROWTH_MB = 100

# -- no other program may be started while untrusted images are decoded -------------------------
_SPAWN_EVENTS = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "pty.spawn")
_watch = {"on": False, "seen": []}
_watch_lock = threading.Lock()


def _audit(event: str, args) -> None:
    if _watch["on"] and event.startswith(_SPAWN_EVENTS):
        _watch["seen"].append((event, str(args)[:200]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records while `on`


@pytest.fixture(scope="module")
def corpus():
    return hostile_files()  # made before any memory baseline: the test's own bytes do not count


@pytest.fixture
def hostile(tmp_path, tiny_engine):
    app = secure_app(tmp_path, tiny_engine, MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES), MAX_IMAGE_PIXELS=str(MAX_PIXELS),
                     RATE_LIMIT_DEFAULT="100000/minute", RATE_LIMIT_VIDEO="100000/minute")
    key = new_key(app, "fuzzer")
    return app, app.test_client(), bearer(key)


class GoodRequests:
    """A fresh good image (new bytes, no reuse) after each hostile one: the service still works."""

    def __init__(self, client, headers) -> None:
        self.client, self.headers, self.count = client, headers, 0

    def check(self) -> None:
        self.count += 1
        response = post_image(self.client, image_bytes(seed=10_000 + self.count), "good.png", self.headers,
                              reuse="false")
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["prediction"] in ("fake", "real")


def _stored_rows(app) -> int:
    from sqlalchemy import func, select

    from api.models import Prediction

    with app.extensions["d3"].db.session() as session:
        return session.scalar(select(func.count()).select_from(Prediction))


def _assert_documented_error(response, expected: set[int], spec: dict, what: str) -> None:
    assert response.status_code in expected, (what, response.status_code, response.get_data(as_text=True)[:300])
    assert response.is_json, what
    error = response.get_json()["error"]
    assert error["code"] == CODES[response.status_code] and error["message"], what
    assert str(response.status_code) in spec["paths"]["/predict"]["post"]["responses"], what
    text = response.get_data(as_text=True)
    for marker in ("alert(", "/etc/passwd", "<script", "%!PS"):
        assert marker not in text, f"{what}: the answer echoes file contents"


def test_hostile_files_get_documented_4xx_bounded_memory_and_the_service_keeps_working(hostile, corpus):
    app, client, headers = hostile
    spec = client.get("/openapi.json").get_json()
    good = GoodRequests(client, headers)
    assert len(corpus) >= 40
    for _ in range(3):  # warm-up: allocator, model buffers, first database connections
        good.check()
    baseline_rss, _ = rss_mb()
    can_measure_peak = reset_peak_rss()
    _watch.update(on=True, seen=[])
    try:
        for name, filename, data, expected in corpus:
            response = post_image(client, data, filename, headers)
            _assert_documented_error(response, expected, spec, name)
            good.check()
    finally:
        _watch["on"] = False
    current_rss, peak_rss = rss_mb()
    print(f"memory: baseline {baseline_rss:.0f} MB, after {current_rss:.0f} MB, peak {peak_rss:.0f} MB")
    assert _watch["seen"] == [], f"a program was started while decoding images: {_watch['seen']}"
    assert _stored_rows(app) == good.count  # nothing at all stored for a refused file
    assert current_rss - baseline_rss < PEAK_GROWTH_MB, (baseline_rss, current_rss)
    if can_measure_peak:
        assert peak_rss - baseline_rss < PEAK_GROWTH_MB, (baseline_rss, peak_rss)


def test_the_whole_corpus_in_one_batch_gets_one_error_entry_per_file(hostile, corpus):
    app, client, headers = hostile
    files = [("files", (filename, data)) for _, filename, data, _ in corpus[:60]]
    files.append(("files", ("the-good-one.png", image_bytes(seed=77))))
    response = post_form(client, "/predict/batch", files, headers)
    assert response.status_code == 200
    body = response.get_json()
    assert body["count"] == len(files) and body["succeeded"] == 1 and body["failed"] == len(files) - 1
    for entry, (name, _, _, expected) in zip(body["results"], corpus[:60], strict=False):
        assert entry["status"] in expected and entry["error"]["code"] == CODES[entry["status"]], name
    assert body["results"][-1]["prediction"] in ("fake", "real")
    assert _stored_rows(app) == 1


@pytest.mark.parametrize("name,data,size", unusual_but_valid(), ids=[c[0] for c in unusual_but_valid()])
def test_unusual_but_valid_images_are_accepted(hostile, name, data, size):
    app, client, headers = hostile
    response = post_image(client, data, "odd.img", headers)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert (body["width"], body["height"]) == size and 0.0 <= body["fake_probability"] <= 1.0


def test_a_gif_with_a_million_frames_costs_one_frame(tmp_path, tiny_engine):
    data = many_frame_gif(1_000_000)  # 23 MB: over the 20 MB default, so this app allows 30 MB
    big = secure_app(tmp_path, tiny_engine, MAX_IMAGE_BYTES=str(30 * 1024 * 1024))
    key = new_key(big, "gif")
    started = time.perf_counter()
    response = post_image(big.test_client(), data, "million.gif", bearer(key))
    elapsed = time.perf_counter() - started
    assert response.status_code == 200 and (response.get_json()["width"], response.get_json()["height"]) == (4, 4)
    assert elapsed < 10, f"{elapsed:.1f}s: frames are being walked"


# -- hostile videos: the same rules on the video route ---------------------------------------
HOSTILE_VIDEOS = [
    ("zero bytes", b""), ("truncated MP4", tiny_mp4(truncated=True)), ("MP4 with no media", tiny_mp4(False)),
    ("HTML renamed .mp4", b"<html><script>alert(1)</script></html>"), ("PNG sent as video", image_bytes()),
    ("ZIP bomb renamed .mp4", zip_bomb()),
]


@pytest.mark.parametrize("name,data", HOSTILE_VIDEOS, ids=[v[0] for v in HOSTILE_VIDEOS])
def test_hostile_videos_get_documented_4xx(hostile, name, data):
    app, client, headers = hostile
    response = client.post("/predict/video", data={"file": (io.BytesIO(data), "clip.mp4")}, headers=headers,
                           content_type="multipart/form-data")
    assert response.status_code in (400, 413, 415, 422), (name, response.get_json())
    assert response.get_json()["error"]["code"] == CODES[response.status_code]
    spec = client.get("/openapi.json").get_json()
    assert str(response.status_code) in spec["paths"]["/predict/video"]["post"]["responses"]
    GoodRequests(client, headers).check()


# -- multipart and request abuse -------------------------------------------------------------
BOUNDARY = b"d3-test-boundary"
PNG = image_bytes(seed=5)


def part(name: bytes, filename: bytes | None, data: bytes, extra: bytes = b"") -> bytes:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return b"--" + BOUNDARY + b"\r\n" + disposition + b"\r\n" + extra + b"\r\n" + data + b"\r\n"


END = b"--" + BOUNDARY + b"--\r\n"
MULTIPART = "multipart/form-data; boundary=" + BOUNDARY.decode()

# name, path, body, content type, expected statuses
RAW_REQUESTS = [
    ("missing boundary", "/predict", part(b"file", b"a.png", PNG) + END, "multipart/form-data", {400}),
    ("empty boundary", "/predict", part(b"file", b"a.png", PNG) + END, "multipart/form-data; boundary=", {400}),
    ("unterminated multipart", "/predict", part(b"file", b"a.png", PNG)[:-30], MULTIPART, {400}),
    ("200 parts", "/predict", b"".join(part(b"f%d" % i, None, b"1") for i in range(200)) + END, MULTIPART, {413}),
    ("2 MB form field", "/predict", part(b"threshold", None, b"0" * 2_000_000) + part(b"file", b"a.png", PNG) + END,
     MULTIPART, {413}),
    ("part without Content-Disposition", "/predict",
     b"--" + BOUNDARY + b"\r\nContent-Type: image/png\r\n\r\n" + PNG + b"\r\n" + END, MULTIPART, {400}),
    ("nested multipart/mixed", "/predict",
     part(b"file", None, b"--inner\r\n\r\nx\r\n--inner--", b"Content-Type: multipart/mixed; boundary=inner\r\n")
     + END, MULTIPART, {400}),
    ("non-UTF-8 filename", "/predict", part(b"file", b"\xff\xfe\xc3(\x80.png", PNG) + END, MULTIPART, {400}),
    ("file sent as a plain field", "/predict", part(b"file", None, PNG) + END, MULTIPART, {400}),
    ("JSON instead of multipart", "/predict", b'{"file": "aGVsbG8="}', "application/json", {400}),
    ("url-encoded form", "/predict", b"file=%89PNG", "application/x-www-form-urlencoded", {400}),
    ("file over MAX_IMAGE_BYTES", "/predict", part(b"file", b"big.png", b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 10))
     + END, MULTIPART, {413}),
    ("65 files in a batch (limit 64)", "/predict/batch",
     b"".join(part(b"files", b"a%d.png" % i, b"x") for i in range(65)) + END, MULTIPART, {400}),
    ("batch without files", "/predict/batch", part(b"threshold", None, b"0.5") + END, MULTIPART, {400}),
    ("threshold NaN", "/predict", part(b"threshold", None, b"nan") + part(b"file", b"a.png", PNG) + END, MULTIPART,
     {400}),
    ("threshold infinity", "/predict", part(b"threshold", None, b"inf") + part(b"file", b"a.png", PNG) + END,
     MULTIPART, {400}),
    ("threshold 1e309", "/predict", part(b"threshold", None, b"1e309") + part(b"file", b"a.png", PNG) + END,
     MULTIPART, {400}),
    ("reuse=maybe", "/predict", part(b"reuse", None, b"maybe") + part(b"file", b"a.png", PNG) + END, MULTIPART, {400}),
]


@pytest.mark.parametrize("name,path,body,content_type,expected", RAW_REQUESTS, ids=[r[0] for r in RAW_REQUESTS])
def test_multipart_abuse_gets_documented_4xx(hostile, name, path, body, content_type, expected):
    app, client, headers = hostile
    response = client.post(path, data=body, content_type=content_type, headers=headers)
    assert response.status_code in expected, (name, response.status_code, response.get_data(as_text=True)[:200])
    assert response.is_json and response.get_json()["error"]["message"]
    assert _stored_rows(app) == 0
    GoodRequests(client, headers).check()


def test_body_shorter_than_its_content_length_is_a_400(hostile):
    app, client, headers = hostile
    body = part(b"file", b"a.png", PNG) + END
    response = client.post("/predict", input_stream=io.BytesIO(body[:100]), content_type=MULTIPART,
                           headers={**headers, "Content-Length": str(len(body))})
    assert response.status_code == 400 and response.is_json
    GoodRequests(client, headers).check()


@pytest.mark.parametrize("filename,shown", [
    (b"../../../../etc/passwd", "passwd"),
    (b"..\\\\..\\\\windows\\\\win.ini", "win.ini"),  # backslashes escaped, as in a quoted-string
    (b"..\\..\\win.ini", "....win.ini"),  # unescaped: the quoted-string rules drop them
    (b"/absolute/path/x.png", "x.png"),
    (b"ok\x01\x07\x1b[31mred.png", "ok[31mred.png"),
    (b"a" * 1000 + b".png", "a" * 255),
])
def test_hostile_filenames_are_kept_for_display_only(hostile, tmp_path, filename, shown):
    app, client, headers = hostile
    body = part(b"file", filename, image_bytes(seed=len(filename))) + END
    response = client.post("/predict", data=body, content_type=MULTIPART, headers=headers)
    assert response.status_code == 200, response.get_json()
    result = response.get_json()
    assert result["filename"] == shown
    assert ".." not in result["result_url"] and "passwd" not in result["result_url"]
    # Every file the service wrote is inside its own object store, under a server-made name.
    store = app.extensions["d3"].settings.resolved_object_store_dir.resolve()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "d3.sqlite" not in p.name]
    assert written and all(store in p.resolve().parents for p in written)
    assert all(result["id"] in p.name for p in written)


def test_duplicate_file_fields_use_the_first(hostile):
    app, client, headers = hostile
    body = part(b"file", b"first.png", image_bytes(seed=61)) + part(b"file", b"second.html", b"<html>") + END
    response = client.post("/predict", data=body, content_type=MULTIPART, headers=headers)
    assert response.status_code == 200 and response.get_json()["filename"] == "first.png"


@pytest.mark.parametrize("method,path,expected", [
    ("PUT", "/predict", 405), ("DELETE", "/predictions", 405), ("GET", "/predict", 405),
    ("GET", "/predictions?limit=100000000000000000000000000000", 400), ("GET", "/predictions?cursor=%FF%FE", 400),
    ("GET", "/predictions?since=yesterday", 400), ("GET", "/predictions?sha256=zz", 400),
    ("GET", "/predictions?filename=" + "x" * 300, 400), ("GET", "/predictions?min_probability=-1", 400),
    ("GET", "/predictions/" + "9" * 10_000, 404), ("GET", "/predictions/../../etc/passwd", 404),
    ("GET", "/objects/d3-results/../../d3.sqlite?expires=9999999999&signature=00", 404),
    ("GET", "/objects/d3-results/x.json?expires=9999999999&signature=%C2%80%FF", 404),  # found by the fuzzer
    ("GET", "/no-such-route", 404),
    # Found by a fuzzing audit: dates past either end of the calendar once in UTC, and NUL bytes
    # (which PostgreSQL refuses to store or compare) were 500s.
    ("GET", "/predictions?since=9999-12-31T23:00:00-05:00", 400),
    ("GET", "/predictions?until=0001-01-01T00:00:00%2B05:00", 400),
    ("GET", "/predictions/stats?since=9999-12-31T23:00:00-05:00", 400),
    ("GET", "/predictions?filename=%00", 400), ("GET", "/predictions?filename=a%00b", 400),
])
def test_odd_requests_get_json_errors(hostile, method, path, expected):
    app, client, headers = hostile
    response = client.open(path, method=method, headers=headers)
    assert response.status_code == expected, response.get_data(as_text=True)[:200]
    assert response.is_json and response.get_json()["error"]["code"]


def test_stats_until_the_first_days_of_year_one_count_from_the_start_of_the_calendar(hostile):
    app, client, headers = hostile
    response = client.get("/predictions/stats?until=0001-01-05", headers=headers)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["total"] == 0


@pytest.mark.parametrize("method,path", [("POST", "/predict/text"), ("PUT", "/models/active")])
def test_malformed_and_deeply_nested_json_get_a_clear_400(hostile, method, path):
    app, client, _ = hostile
    admin = bearer(new_key(app, "admin", admin=True))
    deep = '{"text": ' + "[" * 5000 + "]" * 5000 + "}"
    for body, words in [(deep, "nested too deeply"), ('{"text": "abc"', "not valid JSON"),
                        (b"\xff\xfe{}", "not valid JSON")]:
        response = client.open(path, method=method, data=body, content_type="application/json", headers=admin)
        assert response.status_code == 400, (path, response.get_data(as_text=True)[:300])
        error = response.get_json()["error"]
        assert error["code"] == "invalid_input" and words in error["message"], error
    assert _stored_rows(app) == 0


@pytest.mark.parametrize("request_id", ["x" * 5000, "id with spaces", "<script>", "ünïcode", "a;b|c`d`", ""])
def test_hostile_request_ids_are_replaced(hostile, request_id):
    app, client, headers = hostile
    response = client.get("/health", headers={"X-Request-ID": request_id})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] != request_id
    assert len(response.headers["X-Request-ID"]) == 32 and uuid.UUID(response.headers["X-Request-ID"])
    good = client.get("/health", headers={"X-Request-ID": "nginx-0123456789abcdef"})
    assert good.headers["X-Request-ID"] == "nginx-0123456789abcdef"
