"""The registry: each modality loads on its own; one whose weights are missing is unavailable,
naming the file, while the others serve."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from api.detector.interface import DetectorUnavailable
from api.detector.registry import DetectorRegistry


def settings(**overrides):
    values = {"aasist_model": "aasist-tiny", "aasist_weights": "random:0", "aasist_device": "cpu",
              "aasist_max_batch_size": 4, "d3_cache_dir": "", "text_scoring_model": "random:0",
              "text_sampling_model": "random:1", "text_calibration": "", "text_device": "cpu",
              "text_precision": "auto", "text_min_tokens": 16, "text_max_tokens": 4096, "text_max_chars": 20_000,
              "text_chunk_tokens": 0, "text_max_batch_size": 4}
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_random_models_serve_both_modalities_and_say_they_are_untrained():
    registry = DetectorRegistry.from_settings(settings())
    registry.start()
    assert registry.wait(120)
    described = registry.describe()
    assert described["audio"]["status"] == "ready" and described["audio"]["trained"] is False
    assert described["text"]["status"] == "ready" and described["text"]["trained"] is False
    assert registry.get("audio").name == "aasist" and registry.get("text").name == "fast-detectgpt"


def test_a_missing_file_makes_only_its_modality_unavailable(tmp_path):
    missing = tmp_path / "nowhere" / "AASIST.pth"
    registry = DetectorRegistry.from_settings(settings(aasist_model="AASIST", aasist_weights=str(missing)))
    registry.start(background=False)
    described = registry.describe()
    assert described["audio"]["status"] == "unavailable" and described["audio"]["missing"] == str(missing)
    assert str(missing) in described["audio"]["error"]
    with pytest.raises(DetectorUnavailable) as caught:
        registry.get("audio")
    assert caught.value.missing == str(missing) and str(missing) in caught.value.message
    assert registry.get("text").predict(["a text of more than sixteen byte tokens"])[0].detail["tokens"] == 39


def test_a_missing_hub_model_is_named(tmp_path):
    registry = DetectorRegistry.from_settings(settings(text_scoring_model="EleutherAI/gpt-neo-2.7B",
                                                       text_sampling_model="EleutherAI/gpt-j-6B@float16",
                                                       d3_cache_dir=str(tmp_path)))
    registry.start(background=False)
    text = registry.describe()["text"]
    assert text["status"] == "unavailable" and text["missing"] == "EleutherAI/gpt-neo-2.7B"
    assert registry.describe()["audio"]["status"] == "ready"
