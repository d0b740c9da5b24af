"""`d3 features` through the inference tier: a real `d3 serve-inference` (PyTriton) serving the tiny
random D³ model's backbone as `d3_features`, against the same model in this process.

The session's tier (conftest.py) runs the same seeded model as test_training's MODEL flags, so a
features file made through it must be the in-process file (features, meta, hashes) and train the
same head. The tests that freeze the tier come last and leave it running.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import pytest
import requests
import torch
from click.testing import CliRunner, Result

from api.detector.commands import list_labelled_images
from api.detector.commands import register as register_model
from api.detector.training import Augmentation, FeatureSet, backbone_identity, extract_features
from api.detector.training_commands import register as register_training
from tests.helpers import TINY_MODEL, free_port
from tests.test_training import MODEL, make_split, one_torch_thread  # noqa: F401 - autouse here too

BOUND_S = 2.0  # --inference-timeout of the failure tests
SLACK_S = 3.0  # what a loaded 2-core CI machine may add to it (start-up of the command included)
TRAIN_FLAGS = ["--augment", "--copies", "2", "--seed", "4"]


@pytest.fixture(scope="module")
def d3() -> click.Group:
    group = click.Group("d3")
    register_model(group)
    register_training(group)
    return group


def invoke(d3: click.Group, *args: object, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(d3, [str(a) for a in args], env=env)


def run(d3: click.Group, *args: object, env: dict[str, str] | None = None) -> str:
    result = invoke(d3, *args, env=env)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def model():
    from api.config import load_settings
    from api.detector import DetectorConfig
    from api.detector.factory import build_model

    return build_model(DetectorConfig.from_settings(load_settings(dict(TINY_MODEL))))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tier-synthetic")
    return {"train": make_split(root / "train", 12, 0), "val": make_split(root / "val", 8, 1)}


@pytest.fixture(scope="module")
def local(d3, data, tmp_path_factory) -> dict[str, Path]:
    """The features files made in this process."""
    out = tmp_path_factory.mktemp("local-features")
    paths = {"train": out / "train.pt", "val": out / "val.pt"}
    run(d3, "features", data["train"], "--out", paths["train"], "--no-progress", *TRAIN_FLAGS, *MODEL,
        "--inference-url", "")
    run(d3, "features", data["val"], "--out", paths["val"], "--no-progress", *MODEL, "--inference-url", "")
    return paths


@pytest.fixture(scope="module")
def remote(d3, data, triton_tier_process, tmp_path_factory) -> dict[str, Path]:
    """The same files made through the tier: train over gRPC (--inference-url), val over HTTP (the setting)."""
    triton_tier_process.ensure_running()
    out = tmp_path_factory.mktemp("tier-features")
    paths = {"train": out / "train.pt", "val": out / "val.pt"}
    output = run(d3, "features", data["train"], "--out", paths["train"], "--no-progress", *TRAIN_FLAGS, *MODEL,
                 "--inference-url", triton_tier_process.grpc_url)
    assert f"features from the inference tier {triton_tier_process.grpc_url}" in output
    run(d3, "features", data["val"], "--out", paths["val"], "--no-progress", *MODEL,
        env={"D3_INFERENCE_URL": triton_tier_process.http_url})
    return paths


def test_the_tier_publishes_the_backbone_identity(triton_tier, model):
    assert f"model d3_features (image features) = {model.model_version}" in triton_tier.output()
    config = requests.get(f"{triton_tier.http_url}/v2/models/d3_features/config", timeout=5).json()
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    identity = backbone_identity(model)
    assert {k: parameters[f"d3_{k}"] for k in identity} == identity
    assert identity == {"backbone": "d3-tiny", "clip_weights": "random:0", "shuffle_seed": "0", "precision": "fp32"}
    assert parameters["d3_feature_dim"] == "64" and parameters["d3_model_version"] == model.model_version
    assert [o["dims"] for o in config["output"]] == [["2", "64"]] or [o["dims"] for o in config["output"]] == [[2, 64]]


def test_fp32_features_from_the_tier_are_the_in_process_ones(triton_tier, model, data):
    from api.detector.remote_features import RemoteFeatures
    from api.detector.training import augmented_tensor

    x = torch.stack([augmented_tensor(path.read_bytes(), None, None)
                     for path, _ in list_labelled_images(data["val"])[:8]])
    tier = RemoteFeatures(triton_tier.grpc_url, timeout_s=10.0)
    try:
        assert tier.open() == backbone_identity(model)
        remote = tier.features(x)
    finally:
        tier.stop()
    with torch.inference_mode():
        local = model.features(x)
    assert remote.shape == local.shape == (8, 2, 64) and remote.dtype == torch.float32
    assert (remote - local).abs().max().item() <= 1e-6
    assert not torch.equal(remote[:, 0], remote[:, 1])  # two views, not one twice


def test_features_through_the_tier_are_the_in_process_file(local, remote):
    for split in ("train", "val"):
        a, b = FeatureSet.load(local[split]), FeatureSet.load(remote[split])
        assert a.meta == b.meta
        assert (a.sha256, a.copies, a.files, a.labels.tolist()) == (b.sha256, b.copies, b.files, b.labels.tolist())
        assert b.features.dtype == torch.float16 and torch.equal(a.features, b.features)
    assert FeatureSet.load(remote["train"]).counts() == {"rows": 48, "files": 24, "real": 24, "fake": 24}


def test_tier_features_train_the_same_head(d3, local, remote, tmp_path):
    heads = {}
    for name, files in (("local", local), ("tier", remote)):
        heads[name] = tmp_path / name / "head.pth"
        run(d3, "train", files["train"], "--out", heads[name], "--val", files["val"], "--epochs", "30", "--seed", "3",
            "--start", "scratch", "--no-progress", *MODEL)
    assert heads["local"].read_bytes() == heads["tier"].read_bytes()


def test_train_from_folders_through_the_tier_trains_the_in_process_head(d3, data, triton_tier, tmp_path):
    heads = {}
    for name, url in (("local", ""), ("tier", triton_tier.grpc_url)):
        heads[name] = tmp_path / name / "head.pth"
        run(d3, "train", data["train"], "--out", heads[name], "--val", data["val"], "--epochs", "30",
            "--start", "scratch", "--no-progress", *TRAIN_FLAGS, *MODEL, "--inference-url", url)
    assert heads["local"].read_bytes() == heads["tier"].read_bytes()


def test_a_file_begun_in_process_resumes_through_the_tier(d3, data, local, model, triton_tier, tmp_path):
    out = tmp_path / "resumed.pt"
    items = list_labelled_images(data["train"])
    extract_features(model, items[:10], augmentation=Augmentation(), copies=2, seed=4, batch_size=4, out=out)
    before = triton_tier.metrics("d3_features").get("nv_inference_count", 0.0)
    run(d3, "features", data["train"], "--out", out, "--no-progress", *TRAIN_FLAGS, *MODEL,
        "--inference-url", triton_tier.grpc_url)
    assert triton_tier.metrics("d3_features")["nv_inference_count"] - before == (len(items) - 10) * 2
    assert FeatureSet.load(out).digest() == FeatureSet.load(local["train"]).digest()


# ------------------------------------------------------------------ failures (last: they freeze the tier)
def test_no_tier_there_is_a_clear_error_not_a_hang(d3, data, tmp_path):
    url = f"grpc://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = invoke(d3, "features", data["val"], "--out", tmp_path / "f.pt", "--no-progress", *MODEL,
                    "--inference-url", url, "--inference-timeout", BOUND_S)
    assert result.exit_code == 1 and time.monotonic() - started < BOUND_S + SLACK_S
    assert "cannot compute features on the inference tier" in result.output and url in result.output
    assert "Traceback" not in result.output and not (tmp_path / "f.pt").exists()


def test_a_tier_that_stops_answering_mid_run_ends_the_command_in_bounded_time(d3, data, triton_tier, tmp_path):
    # The model freezes (Triton still answers readiness): the first batch's deadline passes.
    triton_tier.pause_model()
    try:
        started = time.monotonic()
        result = invoke(d3, "features", data["val"], "--out", tmp_path / "f.pt", "--no-progress", *MODEL,
                        "--inference-url", triton_tier.grpc_url, "--inference-timeout", BOUND_S)
        elapsed = time.monotonic() - started
    finally:
        triton_tier.resume_model()
    assert result.exit_code == 1 and elapsed < BOUND_S + SLACK_S, result.output
    assert f"did not answer within {BOUND_S:g} s" in result.output and "Traceback" not in result.output


def test_a_run_that_fails_midway_keeps_its_finished_batches(data, model, tmp_path):
    from api.detector.training import TrainingError

    folder = tmp_path / "data"
    for label in ("real", "fake"):
        (folder / label).mkdir(parents=True)
        for path in sorted((data["val"] / label).iterdir())[:4]:
            (folder / label / path.name).write_bytes(path.read_bytes())
    (folder / "fake" / "zz-broken.png").write_bytes(b"not an image")  # listed last
    out, kwargs = tmp_path / "f.pt", {"augmentation": Augmentation(enabled=False), "copies": 1, "seed": 0,
                                      "batch_size": 3}
    with pytest.raises(TrainingError, match="zz-broken"):
        extract_features(model, list_labelled_images(folder), out=out, **kwargs)
    assert len(FeatureSet.load(out)) == 6  # two full batches of three; the seventh and eighth were pending
    (folder / "fake" / "zz-broken.png").unlink()
    computed: list[int] = []
    resumed = extract_features(model, list_labelled_images(folder), out=out, progress=computed.append, **kwargs)
    assert computed == [6, 2] and len(resumed) == 8
