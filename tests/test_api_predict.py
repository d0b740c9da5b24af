"""POST /predict and /predict/batch, on all three backends and with every input rule."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from api.detector import preprocess_image
from tests.helpers import image_bytes, post_form


def post_image(client, data: bytes, filename: str = "x.png", **form):
    return post_form(client, "/predict", [("file", (filename, data)), *form.items()])


def expected_probability(engine, data: bytes) -> float:
    """The engine's own score for these bytes, computed outside the API."""
    tensor = preprocess_image(Image.open(io.BytesIO(data)))
    return engine.predict([tensor])[0]


def stored_result(app, body: dict) -> dict:
    svc = app.extensions["d3"]
    row = svc.queries.get(body["id"], None, True)
    return json.loads(svc.store.get_bytes(svc.settings.bucket_results, row.result_object))


def test_predict_returns_stored_verdict_on_every_backend(backend_app, tiny_engine):
    client = backend_app.test_client()
    data = image_bytes(seed=1)
    response = post_image(client, data, "cat.png", threshold="0.3")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert uuid.UUID(body["id"])
    probability = expected_probability(tiny_engine, data)
    assert body["fake_probability"] == pytest.approx(probability, abs=1e-6)
    assert body["threshold"] == 0.3
    assert body["prediction"] == ("fake" if probability > 0.3 else "real")
    assert body["confidence"] == pytest.approx(probability if body["prediction"] == "fake" else 1 - probability)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert (body["filename"], body["width"], body["height"]) == ("cat.png", 64, 48)
    assert body["model_version"] == tiny_engine.model_version
    assert body["processing_ms"] > 0
    assert body["created_at"].endswith("Z")
    assert "verdicts mean nothing" in body["warning"]  # the tiny random model says so
    # The stored object matches the response, and the database row exists.
    document = stored_result(backend_app, body)
    for key in ("id", "prediction", "fake_probability", "threshold", "model_version", "sha256"):
        assert document[key] == body[key]
    # result_url really serves that object.
    url = body["result_url"]
    if backend_app.config["BACKEND"] == "s3":
        import urllib.request

        with urllib.request.urlopen(url) as fetched:
            assert json.loads(fetched.read())["id"] == body["id"]
    else:
        fetched = client.get(url.replace("http://localhost", ""))
        assert fetched.status_code == 200
        assert fetched.get_json()["id"] == body["id"]


def test_same_bytes_reuse_stored_result_unless_disabled(client):
    data = image_bytes(seed=2)
    first = post_image(client, data).get_json()
    again = post_image(client, data).get_json()
    assert again["id"] == first["id"] and again["reused"] is True
    fresh = post_image(client, data, reuse="false").get_json()
    assert fresh["id"] != first["id"] and fresh["reused"] is False  # said plainly either way
    other_threshold = post_image(client, data, threshold="0.9").get_json()
    assert other_threshold["id"] != first["id"]


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "P"),
                                      ("WEBP", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("TIFF", "CMYK"),
                                      ("AVIF", "RGB")])
def test_every_allowed_format_is_accepted(client, tiny_engine, fmt, mode):
    data = image_bytes(fmt, mode=mode, seed=3)
    response = post_image(client, data, "picture.bin")  # the filename never decides the type
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["fake_probability"] == pytest.approx(expected_probability(tiny_engine, data),
                                                                    abs=1e-6)


def test_animated_gif_uses_first_frame(client, tiny_engine):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    first = io.BytesIO()
    frames[0].save(first, "GIF")
    body = post_image(client, buffer.getvalue(), "a.gif").get_json()
    assert body["fake_probability"] == pytest.approx(expected_probability(tiny_engine, first.getvalue()), abs=1e-6)


@pytest.mark.parametrize("payload,status,code", [
    (b"%PDF-1.4 not an image", 415, "unsupported_media_type"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 415, "unsupported_media_type"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "unsupported_media_type"),
    (b"", 422, "unprocessable_media"),
])
def test_non_images_are_refused(client, payload, status, code):
    response = post_image(client, payload, "photo.jpg")
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code


def test_truncated_image_is_422(client):
    data = image_bytes("JPEG", size=(256, 256), seed=4)
    response = post_image(client, data[: len(data) // 2])
    assert response.status_code == 422
    assert "truncated or corrupt" in response.get_json()["error"]["message"]


def test_pixel_and_size_limits_are_413(tmp_path, tiny_engine):
    from tests.helpers import make_app

    client = make_app(tmp_path, tiny_engine, MAX_IMAGE_PIXELS="1000", MAX_IMAGE_BYTES="5000").test_client()
    too_many_pixels = post_image(client, image_bytes(size=(40, 40)))
    assert too_many_pixels.status_code == 413
    assert "pixels" in too_many_pixels.get_json()["error"]["message"]
    too_big = post_image(client, image_bytes("BMP", size=(30, 30), seed=5))  # ~2.7 kB < 5 kB
    assert too_big.status_code == 200
    huge = post_image(client, b"\x00" * 20000)
    assert huge.status_code == 413
    assert huge.get_json()["error"]["code"] in {"payload_too_large", "request_entity_too_large"}


@pytest.mark.parametrize("threshold", ["-0.1", "1.5", "abc", "nan"])
def test_bad_threshold_is_400(client, threshold):
    response = post_image(client, image_bytes(), threshold=threshold)
    assert response.status_code == 400
    assert response.get_json()["error"]["parameter"] == "threshold"


def test_missing_file_field_is_400(client):
    response = client.post("/predict", data={"other": (io.BytesIO(b"x"), "x.png")},
                           content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"]["parameter"] == "file"
    assert client.post("/predict").status_code == 400


def test_unknown_route_and_wrong_method_are_json(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.is_json
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]


def test_batch_keeps_order_and_isolates_bad_files(backend_app, tiny_engine):
    client = backend_app.test_client()
    good = [image_bytes(seed=10 + i) for i in range(3)]
    files = [(io.BytesIO(good[0]), "a.png"), (io.BytesIO(b"garbage"), "b.png"),
             (io.BytesIO(good[1]), "c.png"), (io.BytesIO(good[2]), "d.png")]
    response = client.post("/predict/batch", data={"files": files}, content_type="multipart/form-data")
    assert response.status_code == 200
    body = response.get_json()
    assert (body["count"], body["succeeded"], body["failed"]) == (4, 3, 1)
    assert [r["index"] for r in body["results"]] == [0, 1, 2, 3]
    assert body["results"][1]["status"] == 415 and body["results"][1]["filename"] == "b.png"
    for entry, data in zip([body["results"][i] for i in (0, 2, 3)], good, strict=True):
        assert entry["fake_probability"] == pytest.approx(expected_probability(tiny_engine, data), abs=1e-6)
        assert stored_result(backend_app, entry)["id"] == entry["id"]


def test_batch_limits(tmp_path, tiny_engine):
    from tests.helpers import make_app

    client = make_app(tmp_path, tiny_engine, MAX_BATCH_FILES="2").test_client()
    files = [(io.BytesIO(image_bytes(seed=i)), f"{i}.png") for i in range(3)]
    response = client.post("/predict/batch", data={"files": files}, content_type="multipart/form-data")
    assert response.status_code == 400
    assert response.get_json()["error"]["parameter"] == "files"
    empty = client.post("/predict/batch", data={}, content_type="multipart/form-data")
    assert empty.status_code == 400


def test_fifty_concurrent_requests_get_their_own_results(app, tiny_engine):
    images = [image_bytes(seed=100 + i) for i in range(50)]
    expected = [expected_probability(tiny_engine, data) for data in images]

    def call(index: int):
        with app.test_client() as client:
            return index, post_image(client, images[index], f"{index}.png", reuse="false")

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(call, range(50)))
    for index, response in results:
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        assert body["filename"] == f"{index}.png"
        assert body["sha256"] == hashlib.sha256(images[index]).hexdigest()
        assert body["fake_probability"] == pytest.approx(expected[index], abs=1e-5)
    assert len({r.get_json()["id"] for _, r in results}) == 50
    assert len(set(expected)) > 40  # the images really score differently


def test_scores_match_independent_preprocessing(client, tiny_engine):
    """The API feeds the engine exactly the spec's tensor: RGB, bilinear 224x224 squash, CLIP stats."""
    data = image_bytes("PNG", size=(300, 120), seed=7)
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BILINEAR)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    expected = tiny_engine.predict([(tensor - mean) / std])[0]
    assert post_image(client, data).get_json()["fake_probability"] == pytest.approx(expected, abs=1e-5)
