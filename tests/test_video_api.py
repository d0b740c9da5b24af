"""POST /predict/video (sync) and GET /predictions/<id>[/timeline.png]: formats, errors, answers, storage."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile

import pytest
from PIL import Image

from api.services.queries import Filters
from api.utils.video_probe import sample_indices
from tests.helpers import image_bytes, make_app
from tests.video_clips import (
    VIDEO_APP_SETTINGS,
    clip_bytes,
    decoded_levels,
    make_brightness_engine,
    noise_clip_bytes,
    post_video,
)


@pytest.fixture(scope="module")
def brightness_engine():
    engine = make_brightness_engine()
    yield engine
    engine.stop()


@pytest.fixture
def vapp(tmp_path, brightness_engine):
    return make_app(tmp_path, brightness_engine, **VIDEO_APP_SETTINGS)


@pytest.fixture
def vclient(vapp):
    return vapp.test_client()


def svc(app):
    return app.extensions["d3"]


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Temporary files of this test only (other test runs may share /tmp), so leftovers are visible."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def temp_files() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(("d3-video-", "d3-job-"))}


def assert_serving(client, tmp_path) -> None:
    """After a bad upload the worker still analyses a good one."""
    response = post_video(client, clip_bytes(tmp_path, "MJPG", 10, [100] * 5, name="good"), frames="2")
    assert response.status_code == 200, response.get_json()


# -- formats ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fourcc", "fps", "size", "count"), [
    ("MJPG", 10.0, (64, 48), 40),
    ("MJPG", 5.0, (33, 17), 7),  # odd size
    ("MJPG", 30.0, (64, 48), 1),  # a single frame
    ("mp4v", 24.0, (96, 64), 60),
    ("mp4v", 60.0, (320, 240), 90),
    ("avc1", 25.0, (64, 48), 30),  # H.264, when this OpenCV build can encode it
    ("VP80", 12.0, (64, 48), 30),
    ("VP90", 25.0, (128, 72), 20),
])
def test_formats_sizes_rates_and_lengths(vclient, tmp_path, fourcc, fps, size, count):
    levels = [(37 * i + 20) % 256 for i in range(count)]
    data = clip_bytes(tmp_path, fourcc, fps, levels, size)
    sizes: list = []
    reference = decoded_levels(data, tmp_path, sizes=sizes)
    response = post_video(vclient, data, "upload.bin", frames="8")  # the name says nothing
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["media_type"] == "video" and body["status"] == "done"
    assert (body["width"], body["height"]) == sizes[0]  # as decoded (OpenCV's MJPEG writer evens odd sizes)
    assert abs(body["width"] - size[0]) <= 1 and abs(body["height"] - size[1]) <= 1
    assert body["fps"] == pytest.approx(fps)
    frame_count = body["frame_count"]
    assert abs(frame_count - count) <= 1 and frame_count == len(reference)
    assert body["duration_s"] == pytest.approx(frame_count / fps)
    indices = sample_indices(frame_count, 8)
    assert body["frames_analyzed"] == len(indices) == min(8, frame_count)
    assert [f["index"] for f in body["frames"]] == indices
    assert [f["timestamp_s"] for f in body["frames"]] == pytest.approx([i / fps for i in indices], abs=1e-5)
    # The model scores mean brightness: each analysed frame is the frame with that index.
    assert [f["fake_probability"] for f in body["frames"]] == pytest.approx([reference[i] for i in indices],
                                                                            abs=0.01)
    assert body["container"] == {".avi": "avi", ".mp4": "mp4", ".webm": "webm"}[
        {"MJPG": ".avi", "mp4v": ".mp4", "avc1": ".mp4", "VP80": ".webm", "VP90": ".webm"}[fourcc]]


# -- sampling, aggregation, segments ------------------------------------------------------------------------
def test_sampling_picks_the_documented_frames(vclient, tmp_path):
    levels = [5 * i for i in range(50)]  # MJPEG, frame i has brightness 5*i: its score names it
    data = clip_bytes(tmp_path, "MJPG", 10, levels)
    body = post_video(vclient, data, frames="7").get_json()
    assert [f["index"] for f in body["frames"]] == [3, 10, 17, 25, 32, 39, 46]
    assert [round(f["fake_probability"] * 255 / 5) for f in body["frames"]] == [3, 10, 17, 25, 32, 39, 46]
    assert body["sampling"]["mode"] == "frames" and body["sampling"]["planned_frames"] == 7
    # fps=2 over 5 s: 10 frames, one per half second, each the centre of its slice.
    body = post_video(vclient, data, fps="2").get_json()
    assert [f["index"] for f in body["frames"]] == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47]
    assert [round(f["fake_probability"] * 255 / 5) for f in body["frames"]] == [2, 7, 12, 17, 22, 27, 32, 37, 42, 47]
    assert body["sampling"] == {"mode": "fps", "fps": 2.0, "requested_frames": 10, "planned_frames": 10,
                                "capped": False, "rule": "index_i = floor((i + 0.5) * frame_count / n)"}
    # The default is DEFAULT_VIDEO_FRAMES (32); more than the video has means every frame.
    assert post_video(vclient, data).get_json()["frames_analyzed"] == 32
    assert post_video(vclient, data, frames="256").get_json()["frames_analyzed"] == 50


def block_levels() -> tuple[list[int], list[float]]:
    """40 frames at 10 fps in four blocks; sampled with frames=8 the scores are known exactly."""
    levels = [51] * 10 + [230] * 10 + [51] * 10 + [204] * 10
    return levels, [levels[i] / 255 for i in sample_indices(40, 8)]


@pytest.mark.parametrize(("aggregation", "expected_label"), [("mean", "fake"), ("vote", "real"), ("max", "fake")])
def test_aggregates_segments_and_verdict(vclient, tmp_path, aggregation, expected_label):
    levels, scores = block_levels()
    body = post_video(vclient, clip_bytes(tmp_path, "MJPG", 10, levels), frames="8", threshold="0.5",
                      aggregation=aggregation).get_json()
    got = [f["fake_probability"] for f in body["frames"]]
    assert got == pytest.approx(scores, abs=0.006)  # [.2, .2, .9, .9, .2, .2, .8, .8]
    over = [p for p in got if p > 0.5]
    expected = {"mean": math.fsum(got) / 8, "vote": len(over) / 8, "max": max(got)}
    assert body["aggregates"] == pytest.approx(expected)
    assert body["aggregates"]["vote"] == 0.5
    assert body["aggregation"] == aggregation
    assert body["fake_probability"] == pytest.approx(expected[aggregation])
    assert body["prediction"] == expected_label  # fake only when the aggregate is strictly over 0.5
    chosen = expected[aggregation]
    assert body["confidence"] == pytest.approx(chosen if expected_label == "fake" else 1 - chosen)
    # Two runs of two sampled frames; frame k stands for slice [k, k+1) * 0.5 s of the 4 s video.
    segments = body["segments"]
    assert [(s["start_s"], s["end_s"], s["start_frame"], s["end_frame"], s["frames"]) for s in segments] == [
        (1.0, 2.0, 12, 17, 2), (3.0, 4.0, 32, 37, 2)]
    assert segments[0]["max_probability"] == pytest.approx(got[2])
    assert segments[1]["mean_probability"] == pytest.approx((got[6] + got[7]) / 2)
    # Top 5: the four bright frames, brightest first (earlier first on ties), then the earliest dark one.
    assert [f["index"] for f in body["top_frames"]] == [12, 17, 32, 37, 2]
    assert body["top_frames"][0]["timestamp_s"] == pytest.approx(1.2)


def test_threshold_moves_segments(vclient, tmp_path):
    levels, _ = block_levels()
    body = post_video(vclient, clip_bytes(tmp_path, "MJPG", 10, levels), frames="8", threshold="0.85").get_json()
    assert [(s["start_frame"], s["end_frame"]) for s in body["segments"]] == [(12, 17)]
    assert body["aggregates"]["vote"] == 0.25
    assert body["threshold"] == 0.85


# -- the answer and what is stored ----------------------------------------------------------------------------
@pytest.mark.parametrize("keep_videos", ["true", "false"])
def test_storage_matches_the_response(tmp_path, brightness_engine, keep_videos):
    app = make_app(tmp_path, brightness_engine, KEEP_VIDEOS=keep_videos, **VIDEO_APP_SETTINGS)
    client = app.test_client()
    levels, _ = block_levels()
    data = clip_bytes(tmp_path, "MJPG", 10, levels)
    before = temp_files()
    response = post_video(client, data, "my clip.avi", frames="8")
    assert response.status_code == 200
    body = response.get_json()
    assert temp_files() == before  # the upload's temporary file is gone
    for key in ("id", "prediction", "confidence", "fake_probability", "model_version", "result_url",
                "processing_ms", "threshold", "sha256", "created_at", "aggregates", "aggregation",
                "frames_analyzed", "duration_s", "fps", "width", "height", "top_frames", "segments", "frames",
                "timeline_url"):
        assert key in body, key
    assert body["model_version"] == "test/brightness" and body["filename"] == "my clip.avi"
    assert body["size_bytes"] == len(data) and body["processing_ms"] > 0
    s = svc(app)
    row = s.queries.get(body["id"], None, True)
    assert row.media_type == "video" and row.status == "done" and row.video is not None
    assert row.video.frames_analyzed == 8 and row.video.aggregation == "mean"
    assert row.video.mean_probability == pytest.approx(body["aggregates"]["mean"])
    summary = json.loads(s.store.get_bytes(s.settings.bucket_results, row.result_object))
    for key in ("id", "prediction", "fake_probability", "aggregates", "segments", "top_frames", "duration_s"):
        assert summary[key] == body[key], key
    assert "frames" not in summary  # per-frame results live in the frames bucket
    frames = json.loads(s.store.get_bytes(s.settings.bucket_frames, row.video.frames_object))
    assert frames["frames"] == body["frames"]
    if keep_videos == "true":
        assert s.store.get_bytes(s.settings.bucket_videos, row.media_object) == data
        assert row.media_object.endswith(".avi")
    else:
        assert row.media_object is None
        assert not any(os.scandir(s.settings.resolved_object_store_dir / s.settings.bucket_videos))
    # result_url and timeline_url are signed links that serve those objects.
    assert client.get(body["result_url"].replace("http://localhost", "")).get_json()["id"] == body["id"]
    png = client.get(body["timeline_url"].replace("http://localhost", ""))
    assert png.status_code == 200 and png.content_type == "image/png"


def test_get_prediction_shows_the_video_detail(vclient, tmp_path):
    levels, _ = block_levels()
    posted = post_video(vclient, clip_bytes(tmp_path, "MJPG", 10, levels), frames="8").get_json()
    fetched = vclient.get(f"/predictions/{posted['id']}").get_json()
    for key in ("id", "prediction", "fake_probability", "aggregates", "frames", "segments", "top_frames",
                "duration_s", "fps", "frames_analyzed", "status"):
        assert fetched[key] == posted[key], key
    assert fetched["progress"] == {"done": 8, "total": 8}
    assert fetched["timeline_url"].startswith("http://localhost/objects/")
    # Image records are untouched by the hook.
    image = vclient.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=3)), "x.png")},
                         content_type="multipart/form-data").get_json()
    assert "frames" not in vclient.get(f"/predictions/{image['id']}").get_json()


def test_timeline_png(vapp, vclient, tmp_path):
    levels, _ = block_levels()
    body = post_video(vclient, clip_bytes(tmp_path, "MJPG", 10, levels), frames="8").get_json()
    response = vclient.get(f"/predictions/{body['id']}/timeline.png")
    assert response.status_code == 200 and response.content_type == "image/png"
    image = Image.open(io.BytesIO(response.data))
    assert image.format == "PNG" and image.size == (1000, 320)
    image.load()
    # Redrawn from the per-frame results when the stored picture is gone.
    s = svc(vapp)
    row = s.queries.get(body["id"], None, True)
    from api.services.series import timeline_key

    s.store.delete(s.settings.bucket_results, timeline_key(row))
    again = vclient.get(f"/predictions/{body['id']}/timeline.png")
    assert again.status_code == 200 and Image.open(io.BytesIO(again.data)).size == (1000, 320)
    # Unknown id, not-an-id, an image record: JSON 404.
    for path in ("/predictions/00000000-0000-0000-0000-000000000000/timeline.png", "/predictions/nope/timeline.png"):
        missing = vclient.get(path)
        assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"
    image_id = vclient.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=4)), "x.png")},
                            content_type="multipart/form-data").get_json()["id"]
    not_video = vclient.get(f"/predictions/{image_id}/timeline.png")
    assert not_video.status_code == 404 and "not a video" in not_video.get_json()["error"]["message"]


def test_timeline_and_record_are_owner_scoped(vapp, vclient, tmp_path):
    from flask import g

    from api.auth import Caller

    caller = {"value": Caller(owner="alice", name="alice")}

    @vapp.before_request
    def _as_caller():  # what api/auth.py does for a verified key
        g.caller = caller["value"]

    body = post_video(vclient, clip_bytes(tmp_path, "MJPG", 10, [80] * 6), frames="2").get_json()
    assert vclient.get(f"/predictions/{body['id']}/timeline.png").status_code == 200
    caller["value"] = Caller(owner="bob", name="bob")
    theirs = vclient.get(f"/predictions/{body['id']}/timeline.png")
    assert theirs.status_code == 404
    assert vclient.get(f"/predictions/{body['id']}").status_code == 404
    assert svc(vapp).queries.get(body["id"], None, True).owner == "alice"


# -- bad input -----------------------------------------------------------------------------------------------
def truncated_mp4(tmp_path) -> bytes:
    data = clip_bytes(tmp_path, "mp4v", 10, list(range(0, 250, 5)), (64, 48), name="whole")
    return data[: len(data) // 3]


@pytest.mark.parametrize(("make", "filename", "status", "reason", "words"), [
    (lambda tmp: b"", "empty.mp4", 422, "empty", "empty"),
    (lambda tmp: b"these are not the frames you are looking for\n" * 50, "movie.mp4", 422, "not_video",
     "not a video"),
    (lambda tmp: image_bytes("PNG", (320, 240)), "clip.mp4", 422, "image", "PNG image, not a video"),
    (lambda tmp: image_bytes("JPEG"), "clip.avi", 422, "image", "JPEG image"),
    (truncated_mp4, "cut.mp4", 422, "undecodable", "truncated, corrupt"),
])
def test_bad_uploads_get_their_status_and_the_worker_keeps_serving(vclient, tmp_path, make, filename, status,
                                                                   reason, words):
    before = temp_files()
    response = post_video(vclient, make(tmp_path), filename)
    assert response.status_code == status, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "unprocessable_media" and error["reason"] == reason
    assert words in error["message"]
    assert temp_files() == before
    assert_serving(vclient, tmp_path)


def test_nothing_is_stored_for_a_bad_upload(vapp, vclient, tmp_path):
    post_video(vclient, truncated_mp4(tmp_path), "cut.mp4")
    s = svc(vapp)
    _, total, _ = s.queries.list(Filters(), 10, 0, None, None, True)
    assert total == 0
    for bucket in (s.settings.bucket_videos, s.settings.bucket_frames, s.settings.bucket_results):
        assert not any(os.scandir(s.settings.resolved_object_store_dir / bucket)), bucket


def test_missing_field_and_bad_parameters_are_400(vclient, tmp_path):
    data = clip_bytes(tmp_path, "MJPG", 10, [90] * 4)
    response = vclient.post("/predict/video", data={"frames": "4"}, content_type="multipart/form-data")
    assert response.status_code == 400 and response.get_json()["error"]["parameter"] == "file"
    response = vclient.post("/predict/video", data={"video": (io.BytesIO(data), "x.avi")},
                            content_type="multipart/form-data")
    assert response.status_code == 400 and "'file'" in response.get_json()["error"]["message"]
    for form, parameter in [({"frames": "0"}, "frames"), ({"frames": "257"}, "frames"), ({"frames": "ten"}, "frames"),
                            ({"fps": "0"}, "fps"), ({"fps": "nan"}, "fps"), ({"fps": "-1"}, "fps"),
                            ({"frames": "4", "fps": "1"}, "frames"), ({"aggregation": "median"}, "aggregation"),
                            ({"threshold": "1.5"}, "threshold"), ({"async": "maybe"}, "async"),
                            ({"callback_url": "ftp://example.com/x"}, "callback_url")]:
        response = post_video(vclient, data, **form)
        assert response.status_code == 400, form
        assert response.get_json()["error"]["parameter"] == parameter, form
    # Parameters may also come in the query string.
    assert vclient.post("/predict/video?frames=0", data={"file": (io.BytesIO(data), "x.avi")},
                        content_type="multipart/form-data").status_code == 400


def test_size_and_duration_limits_are_413(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, MAX_VIDEO_BYTES="20000", MAX_VIDEO_SECONDS="1.5",
                   **VIDEO_APP_SETTINGS)
    client = app.test_client()
    long_clip = clip_bytes(tmp_path, "MJPG", 10, [120] * 20, name="long")  # 2 s
    assert len(long_clip) < 20000
    response = post_video(client, long_clip)
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error["reason"] == "too_long" and "2.0 s long, over the limit of 1.5 s" in error["message"]
    big = noise_clip_bytes(tmp_path, 10, (320, 240))
    assert len(big) > 20000 + 64 * 1024
    before = temp_files()
    # Far over: refused from Content-Length before the body is read.
    response = post_video(client, big)
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "request_entity_too_large"
    # Just over: the streaming byte counter stops the copy to disk.
    response = post_video(client, big[:20500])
    assert response.status_code == 413
    assert response.get_json()["error"] == {"code": "payload_too_large",
                                            "message": "the video is larger than the limit of 20000 bytes"}
    assert temp_files() == before
    short = clip_bytes(tmp_path, "MJPG", 10, [120] * 10, name="short")
    assert post_video(client, short).status_code == 200


def test_a_decoder_over_its_memory_limit_is_422_and_the_service_survives(tmp_path, brightness_engine):
    app = make_app(tmp_path, brightness_engine, VIDEO_DECODE_MEMORY_MB="64", **VIDEO_APP_SETTINGS)
    client = app.test_client()
    response = post_video(client, clip_bytes(tmp_path, "MJPG", 10, [120] * 10))
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["reason"] == "memory" and "memory limit of 64 MB" in error["message"]
    assert client.get("/health").status_code == 200
    image = client.post("/predict", data={"file": (io.BytesIO(image_bytes(seed=5)), "x.png")},
                        content_type="multipart/form-data")
    assert image.status_code == 200


def test_a_decode_over_the_time_limit_is_killed_and_reported(vapp, vclient, tmp_path):
    from api.exceptions import UnprocessableMedia

    fifo = tmp_path / "stalls.mp4"  # a read that never returns: the child hangs in FFmpeg
    os.mkfifo(fifo)
    videos = svc(vapp).videos
    reader = videos.open_reader(str(fifo), timeout_s=1.0)
    with pytest.raises(UnprocessableMedia) as caught:
        videos.probe(reader, "mp4")
    reader.close()
    assert caught.value.details["reason"] == "timeout"
    assert "took longer than the limit" in caught.value.message
    assert_serving(vclient, tmp_path)


def test_unusable_frame_rate_and_zero_frames(vclient, tmp_path):
    """An AVI whose header claims 5000 frames/s, and one whose frames are all cut off."""
    data = clip_bytes(tmp_path, "MJPG", 10, [120] * 5)
    header = data.find(b"strh")  # AVISTREAMHEADER: ... dwScale at +28, dwRate at +32 from the fourcc
    assert int.from_bytes(data[header + 28:header + 32], "little") == 1
    assert int.from_bytes(data[header + 32:header + 36], "little") == 10
    bad_rate = bytearray(data)
    bad_rate[header + 32:header + 36] = (5000).to_bytes(4, "little")
    response = post_video(vclient, bytes(bad_rate))
    assert response.status_code == 422, response.get_json()
    error = response.get_json()["error"]
    assert error["reason"] == "no_fps" and "no usable frame rate (the container says 5000" in error["message"]
    no_frames = data[:data.find(b"movi") + 4]  # all headers, then nothing
    response = post_video(vclient, no_frames)
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["reason"] in {"no_frames", "undecodable"}, error
    assert "no decodable frames" in error["message"] or "could not be opened" in error["message"]
    assert_serving(vclient, tmp_path)


def test_openapi_documents_the_video_routes(vclient):
    spec = vclient.get("/openapi.json").get_json()
    post = spec["paths"]["/predict/video"]["post"]
    assert set(post["responses"]) >= {"200", "202", "400", "413", "422", "429", "503"}
    body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]["properties"]
    assert set(fields) == {"file"}  # the parameters are query parameters (also accepted as form fields)
    assert {p["name"] for p in post["parameters"]} == {"frames", "fps", "threshold", "aggregation", "async",
                                                       "callback_url", "audio"}
    assert "Location" in post["responses"]["202"]["headers"]
    timeline = spec["paths"]["/predictions/{prediction_id}/timeline.png"]["get"]
    assert "image/png" in timeline["responses"]["200"]["content"] and "404" in timeline["responses"]
    assert "VideoPrediction" in spec["components"]["schemas"]


def test_codec_probe_reports_what_opencv_sees(vclient, tmp_path):
    body = post_video(vclient, clip_bytes(tmp_path, "VP80", 12, [60] * 6), frames="3").get_json()
    assert body["codec"] == "VP80" and body["container"] == "webm"
