"""The provenance block in every image and video answer, its filters and counts; the verdict never moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import urllib3

from tests import provenance_files as pf
from tests.conftest import make_app
from tests.video_clips import clip_bytes


@pytest.fixture(scope="module")
def chain() -> pf.Chain:
    return pf.make_chain("Trusted Generator Inc")


@pytest.fixture(params=["embedded", "postgres", "s3"])
def client(request, tmp_path, tiny_engine, chain):
    anchors = tmp_path / "trust.pem"
    anchors.write_text(chain.root_pem)
    overrides = {"C2PA_TRUST_ANCHORS": str(anchors)}
    if request.param == "postgres":
        overrides["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    elif request.param == "s3":
        overrides.update(request.getfixturevalue("s3_server")["settings"])
    return make_app(tmp_path, tiny_engine, **overrides).test_client()


def post(client, path: str, fields: list[tuple[str, object]], query: str = ""):
    body, content_type = urllib3.encode_multipart_formdata(fields)
    return client.post(path + query, data=body, content_type=content_type)


def predict(client, data: bytes, name: str) -> dict:
    response = post(client, "/predict", [("file", (name, data))])
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_signed_image_answer_carries_the_block_and_the_same_verdict_as_stripped(client, chain):
    signed = pf.sign(pf.plain_image("JPEG", seed=3), "JPEG", chain, generator="ImageMaker")
    body = predict(client, signed, "signed.jpg")
    block = body["provenance"]
    assert block["c2pa"]["status"] == "trusted" and block["c2pa"]["claim_generator"] == "ImageMaker/1.0"
    assert block["c2pa"]["signer"]["issuer"] == "Trusted Generator Inc"
    assert block["declared_ai"] is True and block["declared_ai_source"] == "c2pa"
    stripped = predict(client, pf.strip_metadata(signed, "JPEG"), "stripped.jpg")
    assert stripped["provenance"]["declared_ai"] is None and stripped["provenance"]["c2pa"] == {"present": False}
    assert stripped["fake_probability"] == body["fake_probability"]
    assert stripped["prediction"] == body["prediction"]
    # The stored record says the same.
    again = client.get(f"/predictions/{body['id']}").get_json()
    assert again["provenance"] == block


def test_tampered_and_untrusted_files_are_reported(client, chain):
    tampered = pf.change_one_pixel(pf.sign(pf.plain_image("PNG", seed=4), "PNG", chain), "PNG")
    assert predict(client, tampered, "t.png")["provenance"]["c2pa"]["status"] == "tampered"
    stranger = pf.sign(pf.plain_image("PNG", seed=5), "PNG", pf.make_chain("Someone Else"))
    assert predict(client, stranger, "u.png")["provenance"]["c2pa"]["status"] == "untrusted"


def test_batch_items_each_carry_their_block(client):
    capture = pf.with_xmp(pf.plain_image("PNG", seed=6), "PNG", pf.xmp_packet("digitalCapture"))
    plain = pf.plain_image("PNG", seed=7)
    response = post(client, "/predict/batch", [("files", ("a.png", capture)), ("files", ("b.png", plain))])
    assert response.status_code == 200
    first, second = response.get_json()["results"]
    assert first["provenance"]["iptc_digital_source_type"]["code"] == "digitalCapture"
    assert first["provenance"]["declared_ai"] is False and first["provenance"]["declared_ai_source"] == "xmp"
    assert second["provenance"]["declared_ai"] is None


def test_hostile_metadata_is_a_report_not_an_error(client):
    body = predict(client, pf.malformed_jumbf_jpeg(seed=8), "broken.jpg")
    assert body["provenance"]["c2pa"]["status"] == "error"
    assert body["prediction"] in ("fake", "real")


def test_filters_and_stats_follow_the_claims(client, chain):
    predict(client, pf.sign(pf.plain_image("JPEG", seed=9), "JPEG", chain), "ai.jpg")
    predict(client, pf.with_xmp(pf.plain_image("JPEG", seed=10), "JPEG", pf.xmp_packet("digitalCapture")), "cam.jpg")
    predict(client, pf.plain_image("JPEG", seed=11), "none.jpg")

    def names(query: str) -> set[str]:
        response = client.get(f"/predictions?{query}")
        assert response.status_code == 200, response.get_json()
        return {row["filename"] for row in response.get_json()["results"]}

    assert names("declared_ai=true") == {"ai.jpg"}
    assert names("declared_ai=false") == {"cam.jpg"}
    assert names("declared_ai=unknown") == {"none.jpg"}
    assert names("c2pa=true") == {"ai.jpg"} and names("c2pa=false") == {"cam.jpg", "none.jpg"}
    assert client.get("/predictions?declared_ai=maybe").status_code == 400
    stats = client.get("/predictions/stats").get_json()
    assert stats["by_declared_ai"] == {"true": 1, "false": 1, "unknown": 1} and stats["c2pa_present"] == 1


def test_video_answer_carries_the_block(client, chain, tmp_path: Path):
    clip = clip_bytes(tmp_path, "mp4v")
    signed = pf.sign(clip, "MP4", chain)
    response = post(client, "/predict/video", [("file", ("signed.mp4", signed))], "?frames=4")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["provenance"]["c2pa"]["status"] == "trusted" and body["provenance"]["declared_ai"] is True
    plain = post(client, "/predict/video", [("file", ("plain.mp4", clip))], "?frames=4").get_json()
    assert plain["provenance"]["c2pa"] == {"present": False}
    assert plain["fake_probability"] == body["fake_probability"]
