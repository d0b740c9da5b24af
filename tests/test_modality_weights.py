"""`d3 info` and `d3 fetch-weights` for the speech and text detectors, on files the tests make.

Nothing is downloaded: the offline paths run for real (HF_HUB_OFFLINE); where a download would
succeed online, the download function is replaced by one that writes what the network would
bring (the authors' checkpoint layout, a hub snapshot), and the command's own checks judge it.
"""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

from api.detector import aasist, fast_detectgpt, weights
from api.detector.commands import register
from tests.helpers import TINY_DETECTORS
from tests.test_aasist import randomized
from tests.test_fast_detectgpt import _authors_pair

D3_RANDOM = ["--backbone", "d3-tiny", "--clip-weights", "random:1", "--head-weights", "random:2", "--device", "cpu",
             "--precision", "fp32"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    """`d3 ...` with the cache in tmp_path, offline, and no user caches to find anything in."""
    d3 = click.Group("d3")
    register(d3)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "user-hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("AASIST_MODEL", "AASIST_WEIGHTS", "TEXT_SCORING_MODEL", "TEXT_SAMPLING_MODEL", "TEXT_CALIBRATION"):
        monkeypatch.delenv(name, raising=False)

    def invoke(*args: str, **env: str):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return CliRunner().invoke(d3, [*args, *D3_RANDOM, "--cache-dir", str(tmp_path / "cache")])

    return invoke


def authors_checkpoint(path, model: str = "AASIST", seed: int = 4):
    """A checkpoint in the authors' layout (a plain state_dict of the architecture's keys and shapes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(randomized(aasist.AASIST(aasist.ARCHITECTURES[model]), seed=seed), path)
    return path


# ------------------------------------------------------------------ d3 info
def test_info_covers_every_modality_on_random_weights(run, tiny_detectors):
    result = run("info", "--json", **TINY_DETECTORS)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["weights_ok"] is True  # D³, as before
    for modality in ("audio", "text"):
        state = data["modalities"][modality]
        assert state["ok"] is True and state["trained"] is False
        assert {p["state"] for p in state["parts"]} == {"random"}
        assert state["model_version"] == tiny_detectors.get(modality).model_version
    assert data["modalities"]["audio"]["settings"]["AASIST_MODEL"] == "aasist-tiny"
    assert data["modalities"]["text"]["settings"]["TEXT_SCORING_MODEL"] == "random:0"


def test_info_exits_non_zero_when_a_modality_is_missing_and_names_the_file(run, tmp_path):
    result = run("info", TEXT_SCORING_MODEL="random:0", TEXT_SAMPLING_MODEL="random:1")
    assert result.exit_code == 1, result.output
    expected = tmp_path / "cache" / "aasist" / "AASIST.pth"
    assert f"audio AASIST (AASIST_WEIGHTS=default): MISSING  {expected}" in result.output
    assert aasist.AUTHORS_WEIGHTS_URL["AASIST"] in result.output
    assert "head weights: loadable" in result.output  # D³ is fine; audio alone fails the command
    assert run("info", "--modality", "image", "--modality", "text").exit_code == 0


def test_info_reads_the_authors_checkpoint_as_the_detector_does(run, tmp_path):
    path = authors_checkpoint(tmp_path / "ckpt" / "AASIST.pth")
    result = run("info", "--json", "--modality", "audio", AASIST_WEIGHTS=str(path))
    assert result.exit_code == 0, result.output
    audio = json.loads(result.output)["modalities"]["audio"]
    assert audio["trained"] is True and audio["parts"][0]["state"] == "present"
    assert audio["model_version"] == f"aasist/AASIST/sha256:{weights.file_sha256(path)[:12]}/fp32"
    # Another architecture's keys and shapes, then not a checkpoint at all: present, not loadable.
    small = authors_checkpoint(tmp_path / "ckpt" / "AASIST-L.pth", "AASIST-L")
    result = run("info", "--modality", "audio", AASIST_WEIGHTS=str(small))
    assert result.exit_code == 1 and "present, NOT loadable" in result.output and "do not fit" in result.output
    path.write_bytes(b"<html>rate limited</html>")
    result = run("info", "--modality", "audio", AASIST_WEIGHTS=str(path))
    assert result.exit_code == 1 and "corrupt" in result.output


def test_info_finds_the_lms_in_the_hugging_face_cache_and_in_folders(run, tmp_path):
    cache = tmp_path / "cache"
    _authors_pair(cache)  # the default pair, laid out as the hub lays it out
    result = run("info", "--json", "--modality", "text")
    assert result.exit_code == 0, result.output
    text = json.loads(result.output)["modalities"]["text"]
    assert text["trained"] is True and [p["state"] for p in text["parts"]] == ["present", "present"]
    assert text["model_version"] == "fast-detectgpt/EleutherAI/gpt-j-6B@float16_EleutherAI/gpt-neo-2.7B/analytic/fp32"
    # A folder without weights, and a pair without the authors' constants, are named.
    snapshot = next((cache / "huggingface" / "models--EleutherAI--gpt-neo-2.7B" / "snapshots").iterdir())
    (snapshot / "model.safetensors").unlink()
    result = run("info", "--modality", "text", TEXT_SAMPLING_MODEL=str(snapshot), TEXT_SCORING_MODEL=str(snapshot))
    assert result.exit_code == 1
    assert "no weights file" in result.output and "no criterion-to-probability constants" in result.output


# ------------------------------------------------------------------ d3 fetch-weights
def test_fetch_weights_offline_says_where_each_file_goes_and_how(run, tmp_path):
    result = run("fetch-weights", "--modality", "audio", "--modality", "text")
    assert result.exit_code == 1
    assert "offline" in result.output and aasist.AUTHORS_WEIGHTS_URL["AASIST"] in result.output
    assert str(tmp_path / "cache" / "aasist" / "AASIST.pth") in result.output
    assert "cannot download EleutherAI/gpt-neo-2.7B" in result.output
    assert "cannot download EleutherAI/gpt-j-6B" in result.output
    assert "huggingface-cli download EleutherAI/gpt-j-6B --revision float16" in result.output
    assert not (tmp_path / "cache" / "aasist").exists()


def test_fetch_weights_downloads_the_authors_aasist_checkpoint(run, tmp_path, monkeypatch):
    fetched = []

    def download(url, dest, setting="D3_HEAD_WEIGHTS"):  # what the network would bring
        fetched.append((url, dest, setting))
        return authors_checkpoint(dest)

    monkeypatch.setattr(weights, "download_file", download)
    result = run("fetch-weights", "--modality", "audio")
    assert result.exit_code == 0, result.output
    dest = tmp_path / "cache" / "aasist" / "AASIST.pth"
    assert fetched == [(aasist.AUTHORS_WEIGHTS_URL["AASIST"], dest, "AASIST_WEIGHTS")]
    assert f"audio AASIST (AASIST_WEIGHTS=default): present  {dest}" in result.output
    assert "not the authors' release" in result.output  # the test's file has another sha256
    monkeypatch.setattr(weights, "download_file", lambda *a, **k: pytest.fail("must not download"))
    again = run("fetch-weights", "--if-missing", "--modality", "audio")
    assert again.exit_code == 0 and "present" in again.output
    # A checkpoint that does not load is not usable, and the command says so.
    dest.write_bytes(b"\x00" * 10)
    assert run("info", "--modality", "audio").exit_code == 1


def test_fetch_weights_prefetches_the_text_lms_into_the_cache(run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    asked = []

    def download_lm(ref, cache_root):  # the hub snapshot a download leaves
        asked.append((ref.spec, cache_root))
        if len(asked) == 2:
            _authors_pair(cache_root)
        return cache_root

    monkeypatch.setattr(fast_detectgpt, "download_lm", download_lm)
    result = run("fetch-weights", "--modality", "text")
    assert result.exit_code == 0, result.output
    assert asked == [("EleutherAI/gpt-neo-2.7B", cache), ("EleutherAI/gpt-j-6B@float16", cache)]
    assert "text scoring model (TEXT_SCORING_MODEL=EleutherAI/gpt-neo-2.7B): present" in result.output
    # One model in both roles is fetched once.
    asked.clear()
    run("fetch-weights", "--modality", "text", TEXT_SCORING_MODEL="org/m", TEXT_SAMPLING_MODEL="org/m")
    assert [spec for spec, _ in asked] == ["org/m"]
