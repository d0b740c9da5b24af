"""`d3 features`, `d3 train`, `d3 calibrate` on a synthetic task the tiny random backbone can separate:
fake images carry a periodic high-frequency pattern, as upsampling generators leave."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from api.detector.calibration import rates, threshold_for_eer, threshold_for_fpr
from api.detector.commands import register as register_model
from api.detector.training import FeatureSet, card_path
from api.detector.training_commands import register as register_training


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny matrices: one thread is faster and never waits on a busy sibling core.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def d3() -> click.Group:
    group = click.Group("d3")
    register_model(group)
    register_training(group)
    return group


def run(d3, *args: str) -> str:
    result = CliRunner().invoke(d3, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


MODEL = ["--backbone", "d3-tiny", "--clip-weights", "random:0", "--head-weights", "random:0", "--device", "cpu",
         "--precision", "fp32"]


def make_split(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224]
    pattern = 25.0 * (((yy + xx) % 2) * 2 - 1)[..., None]  # a one-pixel checkerboard
    for label in ("real", "fake"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = Image.fromarray(np.clip(rng.normal(128, 30, (28, 28, 3)), 0, 255).astype(np.uint8))
            pixels = np.asarray(base.resize((224, 224), Image.BILINEAR), dtype=np.float32)
            if label == "fake":
                pixels = pixels + pattern
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / label / f"{label}{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {"train": make_split(root / "train", 16, 0), "val": make_split(root / "val", 10, 1)}


@pytest.fixture(scope="module")
def features(data, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("features")
    d3 = click.Group("d3")
    register_model(d3)
    register_training(d3)
    paths = {"train": out / "train.pt", "val": out / "val.pt"}
    run(d3, "features", data["train"], "--out", paths["train"], "--no-progress", *MODEL)
    run(d3, "features", data["val"], "--out", paths["val"], "--no-progress", *MODEL)
    return paths


def train(d3, data_path: Path, out: Path, val: Path, seed: int = 3, *extra: str) -> str:
    return run(d3, "train", data_path, "--out", out, "--val", val, "--epochs", "60", "--patience", "15",
               "--seed", seed, "--start", "scratch", "--no-progress", *extra, *MODEL)


def test_features_file_holds_two_views_labels_and_hashes(features, data):
    stored = FeatureSet.load(features["train"])
    assert tuple(stored.features.shape) == (32, 2, 64) and stored.features.dtype == torch.float16
    assert stored.labels.tolist().count(1) == 16
    fake0 = (data["train"] / "fake" / "fake0.png").read_bytes()
    assert hashlib.sha256(fake0).hexdigest() in stored.sha256
    assert stored.meta["backbone"] == "d3-tiny" and stored.meta["clip_weights"] == "random:0"


def test_training_lifts_validation_accuracy_from_chance(d3, features, tmp_path):
    out = tmp_path / "a" / "head.pth"
    output = train(d3, features["train"], out, features["val"])
    card = json.loads(card_path(out).read_text())
    assert card["validation"]["start"]["accuracy"] <= 0.6  # a random head is at chance on this task
    assert card["validation"]["trained"]["accuracy"] >= 0.9
    assert card["data"]["train"]["real"] == 16 and card["data"]["validation"]["files"] == 20
    assert card["recipe"]["lr"] == 1e-4 and card["recipe"]["batch_size"] == 256
    assert card["head_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert "val AP" in output and "trained" in output.splitlines()[-2]
    # The authors' layout: a plain state_dict with the spec's keys and shapes.
    state = torch.load(out, weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "query.weight": (64, 64), "query.bias": (64,), "key.weight": (64, 64), "key.bias": (64,),
        "value.weight": (64, 64), "value.bias": (64,), "fc.weight": (1, 128), "fc.bias": (1,)}


def test_same_seed_same_checkpoint_bytes(d3, features, tmp_path):
    first, second = tmp_path / "1" / "head.pth", tmp_path / "2" / "head.pth"
    train(d3, features["train"], first, features["val"])
    train(d3, features["train"], second, features["val"])
    assert first.read_bytes() == second.read_bytes()


def test_cached_features_and_direct_path_give_the_same_head(d3, data, features, tmp_path):
    cached, direct = tmp_path / "c" / "head.pth", tmp_path / "d" / "head.pth"
    train(d3, features["train"], cached, features["val"])
    train(d3, data["train"], direct, data["val"])
    assert cached.read_bytes() == direct.read_bytes()


def test_trained_head_loads_in_predict_and_scores_the_pattern(d3, data, features, tmp_path):
    out = tmp_path / "head.pth"
    train(d3, features["train"], out, features["val"])
    files = [data["val"] / "real" / "real0.png", data["val"] / "fake" / "fake0.png"]
    flags = [f if f != "random:0" or i != 5 else str(out) for i, f in enumerate(MODEL)]
    lines = [json.loads(line) for line in run(d3, "predict", *files, *flags).splitlines()]
    assert lines[0]["prediction"] == "real" and lines[1]["prediction"] == "fake"
    assert f"head-sha256:{hashlib.sha256(out.read_bytes()).hexdigest()[:12]}" in lines[0]["model_version"]


def test_features_resume_keeps_rows_already_done(d3, data, features, tmp_path):
    from api.config import load_settings
    from api.detector import DetectorConfig
    from api.detector.commands import list_labelled_images
    from api.detector.factory import build_model
    from api.detector.training import Augmentation, extract_features

    model = build_model(DetectorConfig.from_settings(load_settings(
        {"D3_BACKBONE": "d3-tiny", "D3_CLIP_WEIGHTS": "random:0", "D3_HEAD_WEIGHTS": "random:0",
         "D3_DEVICE": "cpu", "D3_PRECISION": "fp32"})))
    items = list_labelled_images(data["train"])
    out = tmp_path / "partial.pt"
    kwargs = {"augmentation": Augmentation(), "copies": 2, "seed": 5, "batch_size": 4}
    extract_features(model, items[:10], out=out, **kwargs)  # an interrupted run: 10 of 32 files
    computed: list[int] = []
    resumed = extract_features(model, items, out=out, progress=computed.append, **kwargs)
    assert sum(computed) == len(items) * 2 and computed[0] == 20  # the 20 stored rows were not recomputed
    fresh = extract_features(model, items, out=None, **kwargs)
    assert resumed.digest() == fresh.digest()
    # Augmented copies differ from each other; the clean features file differs from them.
    assert not torch.equal(fresh.features[0], fresh.features[1]) or not torch.equal(
        fresh.features[2], fresh.features[3])


def test_resume_with_other_settings_is_refused(d3, data, tmp_path):
    out = tmp_path / "f.pt"
    run(d3, "features", data["val"], "--out", out, "--no-progress", *MODEL)
    result = CliRunner().invoke(d3, ["features", str(data["val"]), "--out", str(out), "--augment", "--no-progress",
                                     *MODEL])
    assert result.exit_code != 0 and "other settings" in result.output


def test_calibrate_fpr_target_records_threshold_and_plots(d3, features, tmp_path):
    out = tmp_path / "head.pth"
    train(d3, features["train"], out, features["val"])
    plot = tmp_path / "curves.png"
    flags = [f if f != "random:0" or i != 5 else str(out) for i, f in enumerate(MODEL)]
    report = json.loads(run(d3, "calibrate", features["val"], "--target", "fpr", "--max-fpr", "0.1", "--plot", plot,
                            "--json", "--no-progress", *flags))
    assert report["at_threshold"]["fpr"] <= 0.1
    assert len(report["curve"]) == 11
    card = json.loads(card_path(out).read_text())
    assert card["threshold"] == report["threshold"] and card["calibration"]["target"] == "fpr"
    with Image.open(plot) as picture:
        assert picture.format == "PNG" and picture.size[0] > 400


def test_threshold_rules():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    t = threshold_for_fpr(labels, scores, 0.25)
    assert rates(labels, scores, t).fpr <= 0.25 and t == 0.3
    assert rates(labels, scores, threshold_for_fpr(labels, scores, 0.0)).fpr == 0.0
    eer = threshold_for_eer(labels, scores)
    point = rates(labels, scores, eer)
    assert abs(point.fpr - (1 - point.tpr)) == 0.0 and point.fpr == 0.25
