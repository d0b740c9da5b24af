"""`d3 predict / eval / fetch-weights / info` on images the tests write (tiny model, CPU), and the metrics."""

from __future__ import annotations

import csv
import json
import math

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from api.detector import weights
from api.detector.commands import register
from api.detector.config import DetectorConfig
from api.detector.factory import build_model
from api.detector.metrics import accuracies, average_precision, best_threshold
from api.detector.preprocess import preprocess_image
from tests.test_detector_model import save_tiny_checkpoints


@pytest.fixture
def d3() -> click.Group:
    group = click.Group("d3")
    register(group)
    return group


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def flags(tmp_path, clip="random:1", head="random:2") -> list[str]:
    return ["--backbone", "d3-tiny", "--clip-weights", str(clip), "--head-weights", str(head),
            "--device", "cpu", "--precision", "fp32", "--cache-dir", str(tmp_path / "cache")]


def write_image(path, seed: int, size=(40, 60), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode).save(path)


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_registered_on_the_d3_group():
    from api.cli import cli

    assert {"predict", "eval", "fetch-weights", "info"} <= set(cli.commands)


# ---------------------------------------------------------------- predict
def test_predict_one_line_per_file_and_unreadable_files(tmp_path, d3, runner):
    good1, good2, bad = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "broken.png"
    write_image(good1, 1)
    write_image(good2, 2, mode="L")
    bad.write_text("not an image")
    result = runner.invoke(d3, ["predict", str(good1), str(bad), str(tmp_path / "missing.png"), str(good2),
                                *flags(tmp_path)])
    assert result.exit_code == 1
    lines = json_lines(result.output)
    assert [line["file"] for line in lines] == [str(good1), str(bad), str(tmp_path / "missing.png"), str(good2)]
    assert "error" in lines[1] and "error" in lines[2]
    model = build_model(DetectorConfig(backbone="d3-tiny", clip_weights="random:1", head_weights="random:2",
                                       device="cpu"))
    for line, path in ((lines[0], good1), (lines[3], good2)):
        with torch.inference_mode():
            expected = model(preprocess_image(Image.open(path))[None]).item()
        assert line["fake_probability"] == pytest.approx(expected, abs=1e-6)
        assert line["prediction"] == ("fake" if expected > 0.5 else "real")
        assert line["confidence"] == pytest.approx(max(expected, 1 - expected))
        assert line["model_version"] == "d3/d3-tiny/random:1/head-random:2/seed0/fp32"
        assert line["trained"] is False


def test_predict_threshold(tmp_path, d3, runner):
    img = tmp_path / "a.png"
    write_image(img, 3)
    low = json_lines(runner.invoke(d3, ["predict", str(img), "--threshold", "0", *flags(tmp_path)]).output)[0]
    high = json_lines(runner.invoke(d3, ["predict", str(img), "--threshold", "1", *flags(tmp_path)]).output)[0]
    assert low["prediction"] == "fake" and low["confidence"] == pytest.approx(low["fake_probability"])
    assert high["prediction"] == "real" and high["confidence"] == pytest.approx(1 - high["fake_probability"])


def test_predict_with_weight_files_and_env_overridden_by_flags(tmp_path, d3, runner, monkeypatch):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    img = tmp_path / "a.png"
    write_image(img, 4)
    monkeypatch.setenv("D3_HEAD_WEIGHTS", str(tmp_path / "env-value-that-does-not-exist.pth"))
    result = runner.invoke(d3, ["predict", str(img), *flags(tmp_path, clip_file, head_file)])
    assert result.exit_code == 0, result.output
    line = json_lines(result.output)[0]
    assert line["trained"] is True and "/head-sha256:" in line["model_version"]


def test_predict_missing_weights_is_a_clear_error(tmp_path, d3, runner):
    img = tmp_path / "a.png"
    write_image(img, 5)
    result = runner.invoke(d3, ["predict", str(img), *flags(tmp_path, head="")])
    assert result.exit_code == 1
    assert "d3 fetch-weights" in result.output and str(tmp_path / "cache" / "classifier.pth") in result.output


# ---------------------------------------------------------------- eval
def make_dataset(root, n_real=3, n_fake=2):
    for i in range(n_real):
        write_image(root / "real" / ("nested" if i % 2 else "") / f"r{i}.png", 10 + i)
    for i in range(n_fake):
        write_image(root / "fake" / f"f{i}.jpg", 20 + i)
    (root / "fake" / "notes.txt").write_text("not an image, not listed")


def test_eval_summary_json_and_csv(tmp_path, d3, runner):
    make_dataset(tmp_path / "ds")
    out_json, out_csv = tmp_path / "scores.json", tmp_path / "scores.csv"
    result = runner.invoke(d3, ["eval", str(tmp_path / "ds"), "--json", str(out_json), "--csv", str(out_csv),
                                "--no-progress", *flags(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    summary, files = data["summary"], data["files"]
    assert summary["images"] == 5 and summary["real"] == 3 and summary["fake"] == 2
    assert {f["label"] for f in files} == {"real", "fake"} and len(files) == 5
    assert any("nested" in f["file"] for f in files)
    labels = [1 if f["label"] == "fake" else 0 for f in files]
    probs = [f["fake_probability"] for f in files]
    assert summary["ap"] == pytest.approx(average_precision(labels, probs))
    assert summary["accuracy"] == pytest.approx(accuracies(labels, probs, 0.5)[0])
    assert summary["best_accuracy"] >= summary["accuracy"]
    assert summary["trained"] is False
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["file"] for r in rows] == [f["file"] for f in files]
    assert float(rows[0]["fake_probability"]) == pytest.approx(probs[0])
    for word in ("AP:", "accuracy @ 0.5", "real", "fake", "best threshold"):
        assert word in result.output


def test_eval_json_to_stdout_and_max_per_class(tmp_path, d3, runner):
    make_dataset(tmp_path / "ds")
    result = runner.invoke(d3, ["eval", str(tmp_path / "ds"), "--json", "-", "--max-per-class", "1",
                                "--no-progress", *flags(tmp_path)])
    assert result.exit_code == 0, result.output
    start = result.stdout.index("{")
    data = json.loads(result.stdout[start:])
    assert data["summary"]["images"] == 2 and data["summary"]["real"] == 1 and data["summary"]["fake"] == 1


def test_eval_perturbations_change_the_scores(tmp_path, d3, runner):
    make_dataset(tmp_path / "ds", n_real=1, n_fake=1)

    def run(*extra):
        result = runner.invoke(d3, ["eval", str(tmp_path / "ds"), "--json", "-", "--no-progress", *extra,
                                    *flags(tmp_path)])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout[result.stdout.index("{"):])
        return [f["fake_probability"] for f in data["files"]], data["summary"]

    plain, _ = run()
    jpeg, summary = run("--jpeg-quality", "20")
    blurred, summary_blur = run("--blur-sigma", "2")
    assert summary["jpeg_quality"] == 20 and summary_blur["blur_sigma"] == 2
    assert max(abs(a - b) for a, b in zip(plain, jpeg, strict=True)) > 1e-5
    assert max(abs(a - b) for a, b in zip(plain, blurred, strict=True)) > 1e-5


def test_eval_needs_real_and_fake(tmp_path, d3, runner):
    write_image(tmp_path / "ds" / "real" / "a.png", 1)
    result = runner.invoke(d3, ["eval", str(tmp_path / "ds"), *flags(tmp_path)])
    assert result.exit_code == 2 and "fake" in result.output


# ---------------------------------------------------------------- fetch-weights and info
def test_fetch_weights_offline_says_so_and_how_to_place_files(tmp_path, d3, runner, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cache = tmp_path / "cache"
    result = runner.invoke(d3, ["fetch-weights", "--backbone", "ViT-L-14-quickgelu", "--clip-weights", "openai",
                                "--head-weights", "", "--cache-dir", str(cache)])
    assert result.exit_code == 1
    assert "offline" in result.output and "by hand" in result.output
    assert str(cache / "classifier.pth") in result.output and weights.AUTHORS_HEAD_URL in result.output
    assert "timm/vit_large_patch14_clip_224.openai" in result.output
    assert not (cache / "classifier.pth").exists()
    # It never tells the user to run the very command that just failed (`make run` printed that first).
    assert "run `d3 fetch-weights`" not in result.output and "fetch-weights --if-missing" not in result.output
    assert "d3 info" in result.output


def test_fetch_weights_if_missing_exits_at_once_when_present(tmp_path, d3, runner, monkeypatch):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    monkeypatch.setattr(weights, "download_file", lambda *a: pytest.fail("must not download"))
    result = runner.invoke(d3, ["fetch-weights", "--if-missing", "--modality", "image",
                                *flags(tmp_path, clip_file, head_file)])
    assert result.exit_code == 0, result.output
    assert "present" in result.output


def test_fetch_weights_downloads_the_authors_head_into_the_cache(tmp_path, d3, runner, monkeypatch):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    fetched = []

    def fake_download(url, dest):
        fetched.append((url, dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(head_file.read_bytes())
        return dest

    monkeypatch.setattr(weights, "download_file", fake_download)
    result = runner.invoke(d3, ["fetch-weights", "--if-missing", "--modality", "image",
                                *flags(tmp_path, clip_file, "")])
    assert result.exit_code == 0, result.output
    assert fetched == [(weights.AUTHORS_HEAD_URL, tmp_path / "cache" / "classifier.pth")]
    assert str(tmp_path / "cache" / "classifier.pth") in result.output and "OK" in result.output


def test_fetch_weights_refuses_a_downloaded_file_that_does_not_load(tmp_path, d3, runner, monkeypatch):
    _, _, clip_file, _ = save_tiny_checkpoints(tmp_path)

    def fake_download(url, dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"<html>rate limited</html>")
        return dest

    monkeypatch.setattr(weights, "download_file", fake_download)
    result = runner.invoke(d3, ["fetch-weights", *flags(tmp_path, clip_file, "")])
    assert result.exit_code == 1 and "NOT USABLE" in result.output and "corrupt" in result.output


def test_info_json(tmp_path, d3, runner):
    result = runner.invoke(d3, ["info", "--json", "--modality", "image", *flags(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["D3_BACKBONE"] == "d3-tiny" and data["device"] == "cpu" and data["precision"] == "fp32"
    assert data["model_version"] == "d3/d3-tiny/random:1/head-random:2/seed0/fp32"
    assert data["trained"] is False and data["weights_ok"] is True
    assert data["cache_dir"] == str(tmp_path / "cache")


def test_info_reports_missing_weights(tmp_path, d3, runner):
    _, _, clip_file, _ = save_tiny_checkpoints(tmp_path)
    result = runner.invoke(d3, ["info", *flags(tmp_path, clip_file, "")])
    assert result.exit_code == 1, result.output
    assert "head weights: MISSING" in result.output and "backbone weights: loadable" in result.output
    assert "d3 fetch-weights" in result.output and "head-missing" in result.output
    assert "trained: no: weights missing (head)" in result.output


def test_info_with_both_weight_files_missing_fails_and_says_missing(tmp_path, d3, runner):
    """A new user ran `d3 info` before fetching anything: it said `trained: True` and exited 0."""
    missing = ["--clip-weights", str(tmp_path / "nowhere" / "ViT-L-14.pt"),
               "--head-weights", str(tmp_path / "nowhere" / "classifier.pth")]
    base = ["--backbone", "d3-tiny", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(d3, ["info", *base, *missing])
    assert result.exit_code == 1, result.output
    assert "trained: True" not in result.output
    assert "trained: no: weights missing (backbone, head)" in result.output
    assert "backbone weights: MISSING" in result.output and "head weights: MISSING" in result.output
    as_json = runner.invoke(d3, ["info", "--json", *base, *missing])
    assert as_json.exit_code == 1
    data = json.loads(as_json.output)
    assert data["trained"] is False and data["weights_ok"] is False and data["missing"] == ["backbone", "head"]


def test_bad_setting_is_a_usage_error(tmp_path, d3, runner):
    result = runner.invoke(d3, ["info", "--device", "gpu7", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2 and "D3_DEVICE" in result.output


# ---------------------------------------------------------------- metrics
def test_average_precision_matches_the_stepwise_definition():
    # scikit-learn's documented example: average_precision_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) = 0.8333...
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333333)
    assert average_precision([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx((1 + 2 / 3) / 2)
    # Tied scores are one threshold: precision at the tie is 1/2 over the whole recall step.
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_accuracies_and_best_threshold():
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.55, 0.7, 0.9]
    acc, real_acc, fake_acc = accuracies(labels, scores, 0.5)
    assert (acc, real_acc, fake_acc) == pytest.approx((5 / 6, 2 / 3, 1.0))
    threshold, best = best_threshold(labels, scores)
    assert best == pytest.approx(5 / 6)
    assert accuracies(labels, scores, threshold)[0] == pytest.approx(best)
    separable_t, separable_acc = best_threshold([0, 0, 1], [0.2, 0.3, 0.4])
    assert separable_acc == 1.0 and 0.3 < separable_t < 0.4
    assert accuracies([1], [0.5], 0.5)[2] == 0.0  # p > t, not >=: 0.5 is called real
