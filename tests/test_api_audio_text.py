"""POST /predict/audio, POST /predict/text and POST /predict/video?audio=true on the three backends,
with real decoded audio (tones and noise encoded into containers at test time) and real text."""

from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from api.models import Prediction
from tests.audio_clips import audio_file, encode, noise, tone, video_with_soundtrack
from tests.helpers import TINY_DETECTORS, image_bytes, make_app, post_form

TEXT = ("The committee met on Tuesday to review the budget and, after a long discussion about the roads and the "
        "library opening hours, decided to postpone the vote until the spring meeting.")


@pytest.fixture(params=["embedded", "postgres", "s3"])
def mapp(request, tmp_path, tiny_engine, tiny_detectors):
    """The app three ways (embedded, real PostgreSQL, real S3-protocol server) with the tiny detectors."""
    overrides: dict[str, str] = {}
    if request.param == "postgres":
        overrides["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    elif request.param == "s3":
        overrides.update(request.getfixturevalue("s3_server")["settings"])
    return make_app(tmp_path, tiny_engine, tiny_detectors, **overrides)


@pytest.fixture
def eapp(tmp_path, tiny_engine, tiny_detectors):
    return make_app(tmp_path, tiny_engine, tiny_detectors)


def svc(app):
    return app.extensions["d3"]


def quantised(x: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(x, -1, 32767 / 32768) * 32768) / 32768).astype(np.float32)


def rows(app) -> list[Prediction]:
    with svc(app).db.session() as session:
        return list(session.query(Prediction).all())


def post_audio(client, path, **fields):
    return post_form(client, "/predict/audio", [("file", (path.name, path.read_bytes()))]
                     + [(k, str(v)) for k, v in fields.items()])


# ------------------------------------------------------------------ audio
def test_audio_is_scored_windowed_and_stored(mapp, tmp_path):
    client = mapp.test_client()
    x = tone(10.0, freq=300.0) + noise(10.0, amplitude=0.05)
    path = encode(tmp_path / "speech.wav", x, 16_000, "wav")
    response = post_audio(client, path, aggregation="max", threshold="0.4")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["media_type"] == "audio" and body["status"] == "done"
    assert body["model_version"] == "aasist/aasist-tiny/random:0/fp32" and "warning" in body
    assert body["threshold"] == 0.4 and body["aggregation"] == "max"

    assert body["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # 10 s: windows at 0 and 4.0375 s, and one ending on the last sample
    windows = body["windows"]
    assert [(w["start_s"], w["end_s"]) for w in windows] == [(0.0, 4.0375), (4.0375, 8.075), (5.9625, 10.0)]
    # Every window's score is what the detector gives for those decoded samples.
    detector = svc(mapp).detectors.get("audio")
    samples = quantised(x)
    expected = detector.predict([samples[0:64_600], samples[64_600:129_200], samples[160_000 - 64_600:]])
    assert [w["score"] for w in windows] == pytest.approx([s.score for s in expected], abs=1e-5)
    probabilities = [w["fake_probability"] for w in windows]
    assert body["fake_probability"] == pytest.approx(max(probabilities))
    assert body["aggregates"]["mean"] == pytest.approx(sum(probabilities) / 3)
    assert body["prediction"] == ("fake" if max(probabilities) > 0.4 else "real")
    assert body["windows_analyzed"] == 3 and body["duration_s"] == pytest.approx(10.0)
    assert body["result_url"] and body["timeline_url"]
    # Stored like the others: the row, the JSON, the timeline; listed, counted, read back.
    [row] = rows(mapp)
    assert row.media_type == "audio" and row.media_object is None  # KEEP_AUDIO is off by default
    summary = json.loads(svc(mapp).store.get_bytes(svc(mapp).settings.bucket_results, row.result_object))
    assert summary["fake_probability"] == body["fake_probability"] and summary["trained_model"] is False
    detail = client.get(f"/predictions/{body['id']}").get_json()
    assert [w["score"] for w in detail["windows"]] == [w["score"] for w in windows]
    listed = client.get("/predictions?media_type=audio").get_json()
    assert [r["id"] for r in listed["results"]] == [body["id"]]
    assert client.get("/predictions?media_type=text").get_json()["total"] == 0
    assert client.get("/predictions/stats").get_json()["by_media_type"]["audio"] == 1
    png = client.get(f"/predictions/{body['id']}/timeline.png")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert Image.open(io.BytesIO(png.data)).size == (1000, 320)


@pytest.mark.parametrize("fmt", ["flac", "opus", "mp3", "m4a", "aac"])
def test_audio_containers(eapp, tmp_path, fmt):
    response = post_audio(eapp.test_client(), audio_file(tmp_path, fmt, tone(3.0)))
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["container"] == {"opus": "ogg"}.get(fmt, fmt) and len(body["windows"]) == 1


def test_a_videos_soundtrack_to_the_audio_endpoint_and_with_audio_true(eapp, tmp_path):
    client = eapp.test_client()
    video = video_with_soundtrack(tmp_path / "talk.mp4", tone(2.0, freq=500.0))
    response = post_audio(client, video)
    assert response.status_code == 200 and response.get_json()["container"] == "mp4"
    both = post_form(client, "/predict/video", [("file", ("talk.mp4", video.read_bytes())), ("audio", "true"),
                                                ("frames", "4")])
    assert both.status_code == 200, both.get_json()
    body = both.get_json()
    assert body["media_type"] == "video" and body["frames_analyzed"] == 4
    assert body["audio"]["media_type"] == "audio" and body["audio"]["sha256"] == body["sha256"]
    assert body["audio"]["windows_analyzed"] == 1
    silent = video_with_soundtrack(tmp_path / "silent.mp4", None)
    answer = post_form(client, "/predict/video", [("file", ("s.mp4", silent.read_bytes())), ("audio", "true")])
    assert answer.status_code == 200  # the frames' verdict stands
    assert answer.get_json()["audio"]["status_code"] == 422
    assert answer.get_json()["audio"]["error"]["reason"] == "no_audio"


def test_hostile_audio_gets_clear_errors_and_leaves_nothing(tmp_path, tiny_engine, tiny_detectors):
    app = make_app(tmp_path, tiny_engine, tiny_detectors, MAX_AUDIO_BYTES="200000", MAX_AUDIO_SECONDS="3")
    client = app.test_client()
    flac = audio_file(tmp_path, "flac", tone(2.0))
    truncated = flac.read_bytes()[:150]
    cases = [
        (b"", 422, "empty"), (b"just some text, not audio at all " * 20, 422, "not_audio"),
        (image_bytes("PNG"), 422, "image"), (truncated, 422, None),
        (b"ID3" + bytes(range(256)) * 20, 422, None),
    ]
    for content, status, reason in cases:
        response = post_form(client, "/predict/audio", [("file", ("x.wav", content))])
        assert response.status_code == status, (content[:20], response.get_json())
        if reason:
            assert response.get_json()["error"]["reason"] == reason
    long = audio_file(tmp_path, "flac", tone(5.0), name="long")
    response = post_audio(client, long)
    assert response.status_code == 413 and response.get_json()["error"]["reason"] == "too_long"
    big = encode(tmp_path / "big.wav", noise(8.0), 16_000, "wav")  # 256 kB > 200 kB
    assert post_audio(client, big).status_code == 413
    assert post_form(client, "/predict/audio", [("aggregation", "mean")]).status_code == 400
    assert post_audio(client, flac, aggregation="median").status_code == 400
    assert rows(app) == []


def test_async_audio_runs_on_the_job_pool_and_keeps_the_input_when_asked(tmp_path, tiny_engine, tiny_detectors):
    app = make_app(tmp_path, tiny_engine, tiny_detectors, KEEP_AUDIO="true")
    client = app.test_client()
    path = audio_file(tmp_path, "flac", tone(5.0))
    response = post_audio(client, path, **{"async": "true"})
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status"] == "queued" and response.headers["Location"].endswith(f"/predictions/{body['id']}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        detail = client.get(f"/predictions/{body['id']}").get_json()
        if detail["status"] in ("done", "failed"):
            break
        time.sleep(0.3)
    assert detail["status"] == "done", detail
    assert len(detail["windows"]) == 2 and detail["progress"] == {"done": 2, "total": 2}
    [row] = rows(app)
    assert row.video.upload_object is None  # the job's copy is gone, the kept input is its own object
    kept = svc(app).store.get_bytes(svc(app).settings.bucket_media, row.media_object)
    assert kept == path.read_bytes()


def test_the_reconciler_keeps_every_object_of_audio_and_text_predictions(tmp_path, tiny_engine, tiny_detectors):
    """Kept inputs (KEEP_AUDIO, KEEP_TEXTS) live in the media bucket and a recording's timeline beside its
    summary: all are referenced by their rows, so a reconcile with no grace period removes none of them."""
    from api.services.reconcile import reconcile

    app = make_app(tmp_path, tiny_engine, tiny_detectors, KEEP_AUDIO="true", KEEP_TEXTS="true")
    client = app.test_client()
    assert post_audio(client, audio_file(tmp_path, "wav", tone(5.0))).status_code == 200
    assert client.post("/predict/text", json={"text": TEXT}).status_code == 200
    store, settings = svc(app).store, svc(app).settings
    before = {(bucket, key) for bucket in store.buckets for key, _ in store.list_objects(bucket)}
    assert sum(bucket == settings.bucket_media for bucket, _ in before) == 2  # the recording and the text
    assert any(key.endswith("-timeline.png") for _, key in before)
    report = reconcile(svc(app).db, store, settings, grace_s=0)
    assert report.removed == [] and report.rows_without_object == [], report.as_dict()
    assert {(bucket, key) for bucket in store.buckets for key, _ in store.list_objects(bucket)} == before
    orphan = "2026/01/01/orphan.txt"  # ... while an object no row names still goes
    store.put_bytes(settings.bucket_media, orphan, b"x", "text/plain")
    assert reconcile(svc(app).db, store, settings, grace_s=0).removed == [f"{settings.bucket_media}/{orphan}"]


def test_missing_weights_make_only_that_modality_unavailable(tmp_path, tiny_engine):
    missing = tmp_path / "no" / "AASIST.pth"
    app = make_app(tmp_path, tiny_engine, None, **{**TINY_DETECTORS, "AASIST_MODEL": "AASIST",
                                                   "AASIST_WEIGHTS": str(missing)})
    assert svc(app).detectors.wait(120)
    client = app.test_client()
    response = post_audio(client, audio_file(tmp_path, "wav"))
    assert response.status_code == 503 and response.headers["Retry-After"]
    error = response.get_json()["error"]
    assert str(missing) in error["message"] and error["missing"] == str(missing)
    health = client.get("/health").get_json()
    assert health["modalities"]["audio"]["status"] == "unavailable"
    assert health["modalities"]["audio"]["missing"] == str(missing)
    assert health["modalities"]["text"]["status"] == "ready" and health["modalities"]["image"]["ready"] is True
    assert client.post("/predict/text", json={"text": TEXT}).status_code == 200
    assert client.post("/predict", data={"file": (io.BytesIO(image_bytes()), "a.png")}).status_code == 200


# ------------------------------------------------------------------ text
def test_text_as_json_and_as_a_file(mapp):
    client = mapp.test_client()
    response = client.post("/predict/text", json={"text": TEXT, "threshold": 0.3})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["media_type"] == "text" and body["threshold"] == 0.3 and "warning" in body
    assert body["model_version"] == "fast-detectgpt/random:1_random:0/analytic/fp32"
    expected = svc(mapp).detectors.get("text").predict([TEXT])[0]
    assert body["criterion"] == pytest.approx(expected.score, abs=1e-9)
    assert body["fake_probability"] == pytest.approx(expected.fake_probability)
    assert body["tokens"] == len(TEXT.encode()) and body["chunks"][0]["start_token"] == 0
    assert len(body["chunks"]) == 2  # longer than the tiny models' 128-token context
    assert body["prediction"] == ("fake" if expected.fake_probability > 0.3 else "real")
    upload = post_form(client, "/predict/text", [("file", ("essay.txt", TEXT.encode()))])
    assert upload.status_code == 200, upload.get_json()
    assert upload.get_json()["sha256"] == body["sha256"] and upload.get_json()["criterion"] == body["criterion"]
    detail = client.get(f"/predictions/{body['id']}").get_json()
    assert detail["criterion"] == body["criterion"] and detail["chunks"] == body["chunks"]
    assert client.get("/predictions?media_type=text").get_json()["total"] == 2
    assert client.get("/predictions/stats").get_json()["by_media_type"]["text"] == 2
    assert all(row.media_object is None for row in rows(mapp))  # KEEP_TEXTS is off by default


def test_bad_texts_get_clear_errors(tmp_path, tiny_engine, tiny_detectors):
    app = make_app(tmp_path, tiny_engine, tiny_detectors, KEEP_TEXTS="true", MAX_TEXT_BYTES="5000")
    client = app.test_client()
    short = client.post("/predict/text", json={"text": "too short"})
    assert short.status_code == 422
    assert short.get_json()["error"]["reason"] == "too_short" and short.get_json()["error"]["minimum_tokens"] == 16
    assert "at least 16 tokens" in short.get_json()["error"]["message"]
    long = client.post("/predict/text", json={"text": "x" * 5000})  # over MAX_TEXT_BYTES as a JSON body
    assert long.status_code == 413 and "5000" in long.get_json()["error"]["message"]
    # (the character and token limits of the detector itself: tests/test_fast_detectgpt.py)
    assert client.post("/predict/text", json={}).status_code == 400
    assert client.post("/predict/text", json={"text": 12}).status_code == 400
    assert client.post("/predict/text", data="{not json", content_type="application/json").status_code == 400
    binary = post_form(client, "/predict/text", [("file", ("x.txt", b"\xff\xfe\x00bad" * 10))])
    assert binary.status_code == 422 and binary.get_json()["error"]["reason"] == "not_utf8"
    assert post_form(client, "/predict/text", [("file", ("x.txt", b"a" * 6000))]).status_code == 413
    assert rows(app) == []
    kept = client.post("/predict/text", json={"text": TEXT})
    assert kept.status_code == 200
    [row] = rows(app)
    assert svc(app).store.get_bytes(svc(app).settings.bucket_media, row.media_object) == TEXT.encode()


def test_openapi_documents_the_new_endpoints(eapp):
    document = eapp.test_client().get("/openapi.json").get_json()
    assert {"/predict/audio", "/predict/text"} <= set(document["paths"])
    text = document["paths"]["/predict/text"]["post"]
    assert "application/json" in text["requestBody"]["content"]
    assert "audio" in {p["name"] for p in document["paths"]["/predict/video"]["post"]["parameters"]}


def test_a_stored_recording_and_text_fit_the_documented_answer_of_get_prediction(eapp, tmp_path):
    import pydantic

    from api.schemas import AnyPrediction, VideoPrediction

    client = eapp.test_client()
    document = client.get("/openapi.json").get_json()
    answer = document["paths"]["/predictions/{prediction_id}"]["get"]["responses"]["200"]
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/AnyPrediction")
    audio = post_audio(client, audio_file(tmp_path, "wav", tone(5.0))).get_json()
    text = client.post("/predict/text", json={"text": TEXT}).get_json()
    image = post_form(client, "/predict", [("file", ("a.png", image_bytes(seed=1)))]).get_json()
    bodies = {kind: client.get(f"/predictions/{body['id']}").get_json()
              for kind, body in (("audio", audio), ("text", text), ("image", image))}
    for kind, body in bodies.items():
        assert body["media_type"] == kind
        AnyPrediction.model_validate(body)
    with pytest.raises(pydantic.ValidationError):  # a recording's segments are in seconds, not frames
        VideoPrediction.model_validate(bodies["audio"])
