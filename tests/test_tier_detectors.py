"""The speech and text detectors in the inference tier: a real `d3 serve-inference` (PyTriton) serving
the tiny random AASIST and LM pair beside D³, and the API's remote detectors in front of it.

The in-process detectors run the same seeded models, so the tier's scores must be theirs. One tier
for the module (starting Triton costs seconds); the tests that freeze and kill it come last.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import requests

from api.config import load_settings
from api.detector.registry import DetectorRegistry
from api.detector.remote_detectors import RemoteAasist, RemoteFastDetectGPT
from tests.audio_clips import encode, noise, tone
from tests.helpers import TINY_DETECTORS, TINY_MODEL, make_app, post_form

BOUND_S = 2.0  # D3_INFERENCE_TIMEOUT_S of these tests
SLACK_S = 1.5  # what a loaded 2-core CI machine may add to it
TEXT = ("The committee met on Tuesday to review the budget and, after a long discussion about the roads and the "
        "library opening hours, decided to postpone the vote until the spring meeting.")


@pytest.fixture(scope="module")
def detector_tier():
    from tests.triton_tier import TritonTier

    tier = TritonTier({**TINY_MODEL, **TINY_DETECTORS}, D3_TRITON_MAX_QUEUE_SIZE="4")
    tier.start()
    yield tier
    tier.destroy()


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """10 s of tone and noise as a WAV: three scoring windows."""
    return encode(tmp_path_factory.mktemp("audio") / "speech.wav", tone(10.0, freq=300.0) + noise(10.0, amplitude=0.05),
                  16_000, "wav")


@pytest.fixture
def remote_app(tmp_path, detector_tier, tiny_engine):
    """The API with D3_INFERENCE_URL set: its speech and text detectors are the tier's."""
    app = make_app(tmp_path / "remote", tiny_engine, None, D3_INFERENCE_URL=detector_tier.grpc_url,
                   D3_INFERENCE_TIMEOUT_S=str(BOUND_S), RATE_LIMIT_DEFAULT="1000000/minute")
    registry = app.extensions["d3"].detectors
    assert registry.wait(30)
    yield app
    registry.stop()


@pytest.fixture
def local_app(tmp_path, tiny_engine, tiny_detectors):
    return make_app(tmp_path / "local", tiny_engine, tiny_detectors)


def post_audio(client, path):
    return post_form(client, "/predict/audio", [("file", (path.name, path.read_bytes()))])


def audio_and_text(client, recording):
    """One request of each modality the tier serves beside D³, to send again and again."""
    return (lambda: post_audio(client, recording), lambda: client.post("/predict/text", json={"text": TEXT}))


def timed(send):
    started = time.monotonic()
    response = send()
    return response, time.monotonic() - started


def healthy_seconds(send) -> float:
    """How long the request takes with the tier well: its own work (decoding, windows) is not the tier's bound."""
    response, elapsed = timed(send)
    assert response.status_code == 200, response.get_json()
    return elapsed


# ------------------------------------------------------------------ the tier
def test_the_tier_serves_each_detector_with_its_identity(detector_tier, tiny_detectors):
    output = detector_tier.output()
    for modality, model in (("audio", "aasist"), ("text", "fast_detectgpt")):
        detector = tiny_detectors.get(modality)
        assert f"model {model} ({modality}) = {detector.model_version} (RANDOM, UNTRAINED weights)" in output
        assert requests.get(f"{detector_tier.http_url}/v2/models/{model}/ready", timeout=5).status_code == 200
        config = requests.get(f"{detector_tier.http_url}/v2/models/{model}/config", timeout=5).json()
        parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
        assert parameters["detector_model_version"] == detector.model_version
        assert parameters["detector_trained"] == "false"
        assert config["max_batch_size"] == 64 and "dynamic_batching" in config
    assert "NOT SERVED" not in output


def test_a_modality_without_weights_is_not_served_and_says_why(tmp_path):
    from api.detector.tier_detectors import load_bindings

    missing = tmp_path / "AASIST.pth"
    settings = load_settings({**TINY_MODEL, **TINY_DETECTORS, "AASIST_MODEL": "AASIST",
                              "AASIST_WEIGHTS": str(missing)})
    bindings, not_served = load_bindings(settings)
    assert [b.model_name for b in bindings] == ["fast_detectgpt"]
    assert list(not_served) == ["audio"] and str(missing) in not_served["audio"]


# ------------------------------------------------------------------ same scores as in-process
def test_audio_and_text_through_the_tier_score_as_in_process(remote_app, local_app, recording, tiny_detectors):
    remote, local = remote_app.test_client(), local_app.test_client()
    audio = [post_audio(client, recording) for client in (remote, local)]
    assert [r.status_code for r in audio] == [200, 200], audio[0].get_json()
    through, here = (r.get_json() for r in audio)
    assert len(through["windows"]) == len(here["windows"]) == 3
    for a, b in zip(through["windows"], here["windows"], strict=True):
        assert abs(a["score"] - b["score"]) <= 1e-5 and abs(a["fake_probability"] - b["fake_probability"]) <= 1e-5
    assert through["model_version"] == here["model_version"] == tiny_detectors.get("audio").model_version
    assert "warning" in through  # untrained, as in-process

    texts = [client.post("/predict/text", json={"text": TEXT}) for client in (remote, local)]
    assert [r.status_code for r in texts] == [200, 200], texts[0].get_json()
    through, here = (r.get_json() for r in texts)
    assert abs(through["criterion"] - here["criterion"]) <= 1e-5
    assert abs(through["fake_probability"] - here["fake_probability"]) <= 1e-5
    assert through["tokens"] == here["tokens"] and through["calibration"] == here["calibration"]
    assert through["model_version"] == here["model_version"] == tiny_detectors.get("text").model_version

    # Tokenised in the tier, refused there with the in-process answer.
    short = [client.post("/predict/text", json={"text": "too short"}) for client in (remote, local)]
    assert [r.status_code for r in short] == [422, 422]
    assert short[0].get_json() == short[1].get_json()


def test_a_recordings_windows_go_to_the_tier_as_one_request(remote_app, detector_tier, tmp_path):
    # 40 s: ten windows, more than a job's scoring chunk (8), still one request to the tier.
    path = encode(tmp_path / "long.wav", tone(40.0, freq=220.0) + noise(40.0, amplitude=0.02), 16_000, "wav")
    before = detector_tier.metrics("aasist")
    response = post_audio(remote_app.test_client(), path)
    assert response.status_code == 200, response.get_json()
    after = detector_tier.metrics("aasist")
    windows = len(response.get_json()["windows"])
    assert windows == 10
    assert after["nv_inference_request_success"] - before.get("nv_inference_request_success", 0) == 1
    assert after["nv_inference_count"] - before.get("nv_inference_count", 0) == windows


def test_the_remote_detectors_over_http_and_batched(detector_tier, tiny_detectors):
    windows = [np.sin(np.arange(n, dtype=np.float32) / (5 + n % 7)).astype(np.float32) for n in (500, 64_600, 80_000)]
    texts = [TEXT, TEXT.upper(), "x" * 3, TEXT[::-1]]
    audio = RemoteAasist(detector_tier.http_url, BOUND_S)
    text = RemoteFastDetectGPT(detector_tier.http_url, BOUND_S)
    try:
        got = audio.predict(windows)
        want = tiny_detectors.get("audio").predict(windows)
        assert [g.score for g in got] == pytest.approx([w.score for w in want], abs=1e-5)
        assert got[0].detail["logits"] == pytest.approx(want[0].detail["logits"], abs=1e-5)
        got = text.predict([texts[0], texts[1], texts[3]])
        want = tiny_detectors.get("text").predict([texts[0], texts[1], texts[3]])
        assert [g.score for g in got] == pytest.approx([w.score for w in want], abs=1e-5)
        assert [g.detail["tokens"] for g in got] == [w.detail["tokens"] for w in want]
        from api.detector.interface import InputTooShort

        with pytest.raises(InputTooShort, match="at least 16 tokens"):
            text.predict(texts)  # one short text in the call: refused, as in-process
    finally:
        audio.stop()
        text.stop()


def test_health_shows_each_modalitys_identity_from_the_tier(remote_app, detector_tier, tiny_detectors):
    modalities = remote_app.test_client().get("/health").get_json()["modalities"]
    for modality in ("audio", "text"):
        state = modalities[modality]
        assert state["status"] == "ready" and state["ready"] is True, state
        assert state["model_version"] == tiny_detectors.get(modality).model_version and state["trained"] is False
        assert state["inference_tier"]["url"] == detector_tier.grpc_url and state["inference_tier"]["ready"]
    assert modalities["audio"]["architecture"] == "aasist-tiny" and modalities["audio"]["device"] == "cpu"
    assert modalities["text"]["calibration"] == tiny_detectors.get("text").calibration_key
    # The registry of an API with the URL set holds remote detectors, not models.
    assert isinstance(remote_app.extensions["d3"].detectors.get("audio"), RemoteAasist)


def test_without_the_url_the_detectors_run_in_process():
    registry = DetectorRegistry.from_settings(load_settings({**TINY_MODEL, **TINY_DETECTORS}))
    assert {slot.modality for slot in registry.slots.values()} == {"audio", "text"}
    assert [slot.started for slot in registry.slots.values()] == [False, False]
    remote = DetectorRegistry.from_settings(load_settings({**TINY_DETECTORS, "D3_INFERENCE_URL": "grpc://h:1"}))
    assert remote.slots["audio"].resolve() == () and registry.slots["audio"].resolve()[0].kind == "random"


# ------------------------------------------------------------------ failures (last: they freeze and kill the tier)
def test_a_full_tier_queue_is_503_with_retry_after(remote_app, detector_tier):
    # The models stop computing; Triton keeps queueing: 4 requests wait, the rest are refused at once.
    results = detector_tier.burst(lambda _: remote_app.test_client().post("/predict/text", json={"text": TEXT}), 10)
    assert [status for status, _, _, _ in results] == [503] * 10
    for _, retry_after, body, elapsed in results:
        assert int(retry_after) >= 1 and body["error"]["code"] == "unavailable"
        assert elapsed <= BOUND_S + SLACK_S
    assert any("overloaded" in body["error"]["message"] for _, _, body, _ in results), results
    deadline = time.monotonic() + 30  # back once Triton has dropped what waited past its deadline
    while remote_app.test_client().post("/predict/text", json={"text": TEXT}).status_code != 200:
        assert time.monotonic() < deadline, "the tier did not recover from the burst"
        time.sleep(0.3)


def test_a_frozen_tier_is_503_within_the_bound(remote_app, detector_tier, recording):
    client = remote_app.test_client()
    sends = audio_and_text(client, recording)
    own_work = [healthy_seconds(send) for send in sends]
    detector_tier.pause()
    try:
        for send, own_s in zip(sends, own_work, strict=True):
            response, elapsed = timed(send)
            assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1, response.get_json()
            assert elapsed <= BOUND_S + own_s + SLACK_S, f"a frozen tier held the request for {elapsed:.1f} s"
    finally:
        detector_tier.resume()


def test_a_killed_tier_is_503_with_retry_after_and_health_says_so(remote_app, detector_tier, recording):
    client = remote_app.test_client()
    sends = audio_and_text(client, recording)
    own_work = [healthy_seconds(send) for send in sends]
    detector_tier.kill()
    for send, own_s in zip(sends, own_work, strict=True):
        response, elapsed = timed(send)
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1, response.get_json()
        assert response.get_json()["error"]["code"] == "unavailable"
        assert elapsed <= BOUND_S + own_s + SLACK_S
    modalities = client.get("/health").get_json()["modalities"]
    assert modalities["audio"]["status"] == modalities["text"]["status"] == "unavailable"
    assert "unavailable" in modalities["text"]["inference_tier"]["error"]


def test_a_deep_pytriton_home_gets_a_workspace_whose_socket_paths_fit(monkeypatch, tmp_path):
    # A long PYTRITON_HOME (the Kubernetes topology test's volumes) made `fast_detectgpt`'s socket
    # path too long for AF_UNIX, and the tier did not start.
    import pytriton.constants

    from api.detector.triton_server import short_workspace

    monkeypatch.setattr(pytriton.constants, "PYTRITON_HOME", tmp_path / ("d" * 60))
    workspace = short_workspace(["d3", "aasist", "fast_detectgpt"])
    assert workspace is not None and len(f"{workspace}/fast_detectgpt_0_0-server.sock") <= 107
    assert not (tmp_path / ("d" * 60)).exists()
    monkeypatch.setattr(pytriton.constants, "PYTRITON_HOME", Path("/home/d3/.cache/pytriton"))
    assert short_workspace(["d3", "aasist", "fast_detectgpt"]) is None
