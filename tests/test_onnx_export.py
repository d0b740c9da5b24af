"""`d3 export-onnx`: a Triton model repository for a stock Triton, scored by ONNX Runtime on real images.

No stock Triton runs here (PyTriton's server has only the Python backend), so the two halves a
stock Triton joins are tested apart: ONNX Runtime scores the exported file as the in-process model
does, and the written config.pbtxt, parsed as Triton parses it, is what the API's remote engine
reads its tensors and identity from.
"""

from __future__ import annotations

import io

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from api.detector.config import DetectorConfig
from api.detector.errors import InferenceError
from api.detector.factory import build_model
from api.detector.onnx_export import _PixelProbabilities, onnx_probabilities
from api.detector.preprocess import normalize_pixels, pixels_of, preprocess_image
from api.detector.remote_engine import TierModel, wire_images
from api.detector.tier_commands import register
from tests.helpers import image_bytes
from tests.test_detector_model import save_tiny_checkpoints


@pytest.fixture
def d3() -> click.Group:
    group = click.Group("d3")
    register(group)
    return group


def real_images(count: int) -> torch.Tensor:
    images = [Image.open(io.BytesIO(image_bytes("JPEG", size=(90 + 7 * i, 70), seed=i))) for i in range(count)]
    return torch.stack([preprocess_image(image) for image in images])


def read_config(path) -> dict:
    """config.pbtxt as Triton parses it, in the JSON shape tritonclient's get_model_config returns."""
    config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def test_the_exported_model_scores_real_images_as_the_in_process_model(tmp_path, d3, monkeypatch):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    monkeypatch.setenv("D3_PRECISION", "bf16")  # the export is fp32 whatever the service runs
    result = CliRunner().invoke(d3, ["export-onnx", "--out", str(tmp_path / "repo"), "--backbone", "d3-tiny",
                                     "--clip-weights", str(clip_file), "--head-weights", str(head_file),
                                     "--cache-dir", str(tmp_path / "cache"), "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime vs PyTorch on 4 images" in result.output
    onnx_path = tmp_path / "repo" / "d3" / "1" / "model.onnx"
    model = build_model(DetectorConfig(backbone="d3-tiny", clip_weights=str(clip_file), head_weights=str(head_file),
                                       device="cpu", precision="fp32", cache_dir=str(tmp_path / "cache")))
    for count in (1, 5):  # the batch axis is dynamic
        images = real_images(count)
        with torch.inference_mode():
            expected = model(images).numpy()
        got = onnx_probabilities(onnx_path, images.numpy())
        assert got.shape == (count,)
        assert np.abs(got - expected).max() <= 1e-5
        assert len(set(np.round(got, 6))) == count  # different images, different scores: not a constant

    tier = TierModel.from_config(read_config(tmp_path / "repo" / "d3" / "config.pbtxt"), "d3")
    assert (tier.input_name, tier.input_dtype, tier.output_name, tier.max_batch_size) == (
        "images", "FP32", "fake_probability", 8)
    assert tier.model_version == model.model_version and tier.trained is True
    assert (tier.backbone, tier.precision) == ("d3-tiny", "fp32")
    assert tier.version_input is None  # one fixed head: the API sends no version pins to it


def test_a_pixels_export_normalises_in_the_graph_and_the_api_sends_it_pixels(tmp_path, d3):
    _, _, clip_file, head_file = save_tiny_checkpoints(tmp_path)
    result = CliRunner().invoke(d3, ["export-onnx", "--out", str(tmp_path / "repo"), "--input", "pixels",
                                     "--backbone", "d3-tiny", "--clip-weights", str(clip_file),
                                     "--head-weights", str(head_file), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime vs PyTorch on 4 images" in result.output
    model = build_model(DetectorConfig(backbone="d3-tiny", clip_weights=str(clip_file), head_weights=str(head_file),
                                       device="cpu", precision="fp32", cache_dir=str(tmp_path / "cache")))
    images = real_images(3)
    with torch.inference_mode():
        expected = model(images).numpy()

    tier = TierModel.from_config(read_config(tmp_path / "repo" / "d3" / "config.pbtxt"), "d3")
    assert (tier.input_name, tier.input_dtype, tier.pixel_input) == ("pixels", "UINT8", "pixels")
    name, sent, datatype = wire_images(tier, images.numpy())  # what the API puts on the wire
    assert (name, datatype, sent.dtype, sent.shape) == ("pixels", "UINT8", np.uint8, (3, 3, 224, 224))
    got = onnx_probabilities(tmp_path / "repo" / "d3" / "1" / "model.onnx", sent)
    assert np.abs(got - expected).max() <= 1e-5
    assert len(set(np.round(got, 6))) == 3

    # Images that came from no 8-bit pixels cannot be sent to it: a clear error, not a wrong score.
    with pytest.raises(InferenceError, match="only uint8 'pixels'"):
        wire_images(tier, torch.randn(2, 3, 224, 224).numpy())


def test_the_graphs_normalisation_is_the_services_bit_for_bit():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    pixels[0, :, 0, :3] = [[0, 1, 255]] * 3  # both ends of the range in every channel
    as_graph = _PixelProbabilities(torch.nn.Identity())  # the wrapped "model" returns what it gets
    with torch.no_grad():
        normalised = as_graph(torch.from_numpy(pixels)).squeeze(1).numpy()
    assert np.array_equal(normalised, normalize_pixels(pixels))


def test_the_api_sends_float_images_to_a_model_that_takes_only_them(tmp_path, d3):
    result = CliRunner().invoke(d3, ["export-onnx", "--out", str(tmp_path / "repo"), "--backbone", "d3-tiny",
                                     "--clip-weights", "random:1", "--head-weights", "random:2", "--check-images", "0"])
    assert result.exit_code == 0, result.output
    tier = TierModel.from_config(read_config(tmp_path / "repo" / "d3" / "config.pbtxt"), "d3")
    images = real_images(2).numpy()
    assert pixels_of(images) is not None  # pixels exist, but this model has no input for them
    name, sent, datatype = wire_images(tier, images)
    assert (name, datatype) == ("images", "FP32") and np.array_equal(sent, images)
    half = TierModel.from_config({**read_config(tmp_path / "repo" / "d3" / "config.pbtxt"),
                                  "input": [{"name": "images", "data_type": "TYPE_FP16", "dims": ["3", "224", "224"]}]},
                                 "d3")
    assert wire_images(half, images)[1].dtype == np.float16


def test_an_untrained_export_says_so_and_the_config_carries_it(tmp_path, d3):
    result = CliRunner().invoke(d3, ["export-onnx", "--out", str(tmp_path / "repo"), "--model-name", "d3_onnx",
                                     "--backbone", "d3-tiny", "--clip-weights", "random:3", "--head-weights",
                                     "random:4", "--check-images", "0"])
    assert result.exit_code == 0, result.output
    assert "untrained" in result.output and "ONNX Runtime vs PyTorch" not in result.output
    config = read_config(tmp_path / "repo" / "d3_onnx" / "config.pbtxt")
    assert config["name"] == "d3_onnx" and config["platform"] == "onnxruntime_onnx"
    tier = TierModel.from_config(config, "d3_onnx")
    assert tier.trained is False and "random:3" in tier.model_version


def test_an_unknown_backbone_is_a_clear_error_and_writes_nothing(tmp_path, d3):
    result = CliRunner().invoke(d3, ["export-onnx", "--out", str(tmp_path / "repo"), "--backbone", "no-such-vit",
                                     "--clip-weights", "random:0", "--head-weights", "random:0"])
    assert result.exit_code != 0 and "unknown backbone 'no-such-vit'" in result.output
    assert not (tmp_path / "repo").exists()
