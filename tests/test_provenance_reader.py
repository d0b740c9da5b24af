"""The provenance reader on files the tests sign and write themselves (no Flask)."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from api.utils.provenance import ProvenanceLimits, read_provenance, source_type
from tests import provenance_files as pf


@pytest.fixture(scope="module")
def chain() -> pf.Chain:
    return pf.make_chain()


@pytest.fixture(scope="module")
def limits(chain) -> ProvenanceLimits:
    return ProvenanceLimits(trust_anchors_pem=chain.root_pem)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_signed_file_reports_manifest_signer_and_ai_claim(fmt, chain, limits):
    signed = pf.sign(pf.plain_image(fmt), fmt, chain, generator="studio-gen")
    block = read_provenance(signed, pf.MIME[fmt], limits)
    c2pa = block["c2pa"]
    assert c2pa["present"] is True
    assert c2pa["status"] == "trusted"
    assert c2pa["claim_generator"] == "studio-gen/1.0"
    assert c2pa["actions"] == [{"action": "c2pa.created", "digital_source_type": pf.AI, "software_agent": None}]
    assert c2pa["signer"]["issuer"] == chain.org and c2pa["signer"]["trust"] == "trusted"
    assert "assertion.dataHash.match" in c2pa["validation_codes"]["success"]
    assert c2pa["ingredients"] == 0
    assert block["declared_ai"] is True and block["declared_ai_source"] == "c2pa"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_pixels_changed_after_signing_is_tampered(fmt, chain, limits):
    signed = pf.sign(pf.plain_image(fmt), fmt, chain)
    edited = pf.change_one_pixel(signed, fmt)
    Image.open(io.BytesIO(edited)).load()  # still a valid image
    c2pa = read_provenance(edited, pf.MIME[fmt], limits)["c2pa"]
    assert c2pa["status"] == "tampered"
    assert "assertion.dataHash.mismatch" in c2pa["validation_codes"]["failure"]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_chain_outside_the_trust_list_is_untrusted(fmt, limits):
    stranger = pf.make_chain("Unknown Signer Ltd")
    c2pa = read_provenance(pf.sign(pf.plain_image(fmt), fmt, stranger), pf.MIME[fmt], limits)["c2pa"]
    assert c2pa["status"] == "untrusted"
    assert c2pa["signer"]["trust"] == "untrusted" and c2pa["signer"]["issuer"] == "Unknown Signer Ltd"
    assert "signingCredential.untrusted" in c2pa["validation_codes"]["failure"]


def test_without_a_trust_list_every_signer_is_untrusted(chain):
    c2pa = read_provenance(pf.sign(pf.plain_image("JPEG"), "JPEG", chain), "image/jpeg", ProvenanceLimits())["c2pa"]
    assert c2pa["status"] == "untrusted" and c2pa["signer"]["trust_list_configured"] is False


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("code", pf.SOURCE_TYPES)
def test_xmp_only_files_report_their_source_type(fmt, code, limits):
    style = "attribute" if code.startswith(("trained", "digital")) else "element"
    data = pf.with_xmp(pf.plain_image(fmt), fmt, pf.xmp_packet(code, style))
    block = read_provenance(data, pf.MIME[fmt], limits)
    assert block["c2pa"] == {"present": False}
    assert block["iptc_digital_source_type"]["code"] == code
    assert block["iptc_digital_source_type"]["label"]
    expected_ai = code in ("trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia")
    assert block["declared_ai"] is expected_ai and block["declared_ai_source"] == "xmp"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_no_metadata_declares_nothing(fmt, limits):
    block = read_provenance(pf.plain_image(fmt), pf.MIME[fmt], limits)
    assert block == {"c2pa": {"present": False}, "iptc_digital_source_type": None, "declared_ai": None,
                     "declared_ai_source": None, "notes": []}


def test_stripping_removes_every_claim(chain, limits):
    signed = pf.with_xmp(pf.sign(pf.plain_image("PNG"), "PNG", chain), "PNG", pf.xmp_packet("digitalCapture"))
    assert read_provenance(signed, "image/png", limits)["declared_ai"] is True  # the signed claim wins
    stripped = pf.strip_metadata(signed, "PNG")
    assert read_provenance(stripped, "image/png", limits)["declared_ai"] is None


def test_unknown_source_type_code_declares_nothing():
    assert source_type("http://cv.iptc.org/newscodes/digitalsourcetype/somethingNew")["declares_ai"] is None
    assert source_type("trainedAlgorithmicMedia")["uri"].endswith("/trainedAlgorithmicMedia")


# -- hostile metadata: bounded, reported, never an exception ---------------------------------------------
def test_malformed_jumbf_is_reported(limits):
    block = read_provenance(pf.malformed_jumbf_jpeg(), "image/jpeg", limits)
    assert block["c2pa"]["present"] is True and block["c2pa"]["status"] == "error"
    assert block["c2pa"]["error"]


def test_huge_xmp_packet_is_skipped_with_a_note(limits):
    data = pf.with_xmp(pf.plain_image("PNG"), "PNG", pf.xmp_packet("trainedAlgorithmicMedia",
                                                                   padding=limits.max_xmp_bytes + 10))
    started = time.perf_counter()
    block = read_provenance(data, "image/png", limits)
    assert time.perf_counter() - started < 5
    assert block["iptc_digital_source_type"] is None and block["declared_ai"] is None
    assert any("larger than" in note for note in block["notes"])


def test_xml_entity_bomb_in_xmp_is_refused(limits):
    bomb = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
            b'<r>&c;</r></x:xmpmeta>')
    block = read_provenance(pf.with_xmp(pf.plain_image("JPEG"), "JPEG", bomb), "image/jpeg", limits)
    assert block["declared_ai"] is None and any("could not be parsed" in note for note in block["notes"])


@pytest.fixture(scope="module")
def many_ingredients(chain) -> bytes:
    return pf.sign(pf.plain_image("JPEG"), "JPEG", chain, ingredients=30)


def test_many_ingredients_are_counted(many_ingredients, limits):
    assert read_provenance(many_ingredients, "image/jpeg", limits)["c2pa"]["ingredients"] == 30


def test_reader_time_limit_stops_the_child(many_ingredients, chain):
    tight = ProvenanceLimits(timeout_s=0.05, trust_anchors_pem=chain.root_pem)
    started = time.perf_counter()
    c2pa = read_provenance(many_ingredients, "image/jpeg", tight)["c2pa"]
    assert time.perf_counter() - started < 2
    assert c2pa["status"] == "error" and "longer than" in c2pa["error"]


def test_reader_memory_limit_ends_only_the_child(many_ingredients, chain):
    starved = ProvenanceLimits(memory_mb=48, trust_anchors_pem=chain.root_pem)
    c2pa = read_provenance(many_ingredients, "image/jpeg", starved)["c2pa"]
    assert c2pa["status"] == "error"
