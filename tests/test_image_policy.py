"""One image policy for the API and the `d3` commands: formats, 16-bit samples, EXIF, and the notes
that tell a user what was done with the file (issue 16, "what a new user tripped over").

Real encoded files (PNG 16-bit, JPEG with an EXIF block, AVIF) through the real app and the real
`d3 predict` command, scored by the tiny seeded model; expected scores come from the same engine.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, features

from api.detector.preprocess import preprocess_image
from api.utils.images import decode_image
from tests.helpers import image_bytes, post_form

CLI_MODEL = ["--backbone", "d3-tiny", "--clip-weights", "random:0", "--head-weights", "random:0",
             "--device", "cpu", "--precision", "fp32"]


def score(engine, image: Image.Image) -> float:
    return engine.predict([preprocess_image(image)])[0]


def predict(client, data: bytes, filename: str = "x.png", **form):
    response = post_form(client, "/predict", [("file", (filename, data)), *form.items()])
    return response.status_code, response.get_json()


def cli_predict(tmp_path, name: str, data: bytes) -> dict:
    from api.cli import cli

    path = tmp_path / name
    path.write_bytes(data)
    result = CliRunner().invoke(cli, ["predict", str(path), *CLI_MODEL, "--cache-dir", str(tmp_path / "cache")])
    [line] = [json.loads(text) for text in result.output.splitlines() if text.startswith("{")]
    return line


def grey16_png() -> tuple[bytes, np.ndarray]:
    """A 16-bit greyscale gradient (every value above 255, as a scanner or a render writes them)."""
    ramp = np.linspace(4096, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue(), ramp


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_to_white(client, tiny_engine, tmp_path):
    data, ramp = grey16_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    clipped = Image.open(io.BytesIO(data)).convert("RGB")  # what convert("RGB") alone makes of it
    assert np.asarray(clipped).min() == 255  # all white: the bug a new user hit
    scaled = Image.fromarray((ramp >> 8).astype(np.uint8), "L")
    expected, white = score(tiny_engine, scaled), score(tiny_engine, clipped)
    assert expected != pytest.approx(white, abs=1e-6)  # the test can tell the two apart

    status, body = predict(client, data, "scan16.png")
    assert status == 200, body
    assert body["fake_probability"] == pytest.approx(expected, abs=1e-6)
    assert any("16 bits" in note and "8 bits" in note for note in body["notes"]), body["notes"]
    line = cli_predict(tmp_path, "scan16.png", data)  # the command line scores the same pixels
    assert line["fake_probability"] == pytest.approx(expected, abs=1e-6)
    assert line["notes"] == body["notes"]


def exif_jpeg(orientation: int) -> bytes:
    rng = np.random.default_rng(11)
    image = Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_ignored_as_the_authors_do_and_the_response_says_so(client, tiny_engine, tmp_path):
    data = exif_jpeg(6)  # "rotate 90° to display"
    stored = Image.open(io.BytesIO(data))
    stored.load()
    as_stored = score(tiny_engine, stored.convert("RGB"))
    from PIL import ImageOps

    rotated = score(tiny_engine, ImageOps.exif_transpose(stored).convert("RGB"))
    assert as_stored != pytest.approx(rotated, abs=1e-6)

    status, body = predict(client, data, "phone.jpg")
    assert status == 200, body
    assert body["fake_probability"] == pytest.approx(as_stored, abs=1e-6)  # the pixels as stored
    assert body["width"] == 64 and body["height"] == 40
    [note] = body["notes"]
    assert "EXIF orientation ignored" in note and "rotated 90°" in note
    assert cli_predict(tmp_path, "phone.jpg", data)["notes"] == body["notes"]
    # Orientation 1 ("as stored") is nothing to mention.
    assert predict(client, exif_jpeg(1), "upright.jpg")[1]["notes"] == []


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF plugin")
def test_avif_is_scored_by_the_api_and_the_command_alike(client, tiny_engine, tmp_path):
    data = image_bytes("AVIF", seed=12)
    status, body = predict(client, data, "render.avif")
    assert status == 200, body  # main refused it with 415 while `d3 predict` scored it
    decoded = decode_image(data, 10_000_000)
    assert decoded.format == "AVIF"
    assert body["fake_probability"] == pytest.approx(score(tiny_engine, decoded.image), abs=1e-6)
    assert cli_predict(tmp_path, "render.avif", data)["fake_probability"] == pytest.approx(
        body["fake_probability"], abs=1e-6)


def test_a_format_the_api_refuses_the_command_refuses_too(client, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, format="ICO")  # Pillow opens ICO, the policy does not
    data = buffer.getvalue()
    status, body = predict(client, data, "favicon.ico")
    assert status == 415 and "not a supported image" in body["error"]["message"]
    line = cli_predict(tmp_path, "favicon.ico", data)
    assert "fake_probability" not in line and "not a supported image" in line["error"]


def test_a_reused_result_says_so_and_how_to_turn_it_off(client):
    data = image_bytes(seed=13)
    status, first = predict(client, data)
    assert status == 200 and first["reused"] is False and first["notes"] == []
    status, again = predict(client, data)
    assert status == 200 and again["reused"] is True and again["id"] == first["id"]
    [note] = again["notes"]
    assert first["id"] in note and "reuse=false" in note
    status, fresh = predict(client, data, reuse="false")
    assert status == 200 and fresh["reused"] is False and fresh["id"] != first["id"]
    assert fresh["fake_probability"] == first["fake_probability"]  # same bytes, same seeded model
