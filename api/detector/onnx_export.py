"""The D³ model as a Triton model repository for a stock Triton: `model.onnx` + `config.pbtxt`.

The API speaks the standard KServe v2 protocol, so a stock Triton (its ONNX Runtime backend, or a
TensorRT engine built from the same file) can stand in for `d3 serve-inference`. The repository
names the tensors the API sends and reads (`images` FP32 [3, 224, 224] -> `fake_probability`
[1]) and publishes the model's identity as config `parameters`, as the PyTriton tier does.

With `pixels=True` the model takes `pixels` UINT8 [3, 224, 224] instead and normalises them
inside the graph, with the preprocessing's own constants and order of operations: a quarter of
the bytes, and the API skips encoding floats (its cost per image is in docs/PERFORMANCE.md).

What an export is not: it holds one head, fixed at export time. Model-version switching and
per-request version pins (`head_version`) stay with `d3 serve-inference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from api.detector.config import IMAGE_SIZE
from api.detector.errors import DetectorError
from api.detector.preprocess import CLIP_MEAN, CLIP_STD, normalize_pixels
from api.detector.triton_server import INPUT_NAME, MODEL_NAME, OUTPUT_NAME, PIXEL_INPUT, identity_parameters

# opset 18 has Col2Im, which the patch shuffle's fold needs.
OPSET = 18
# fp32 ONNX Runtime against fp32 PyTorch: the same graph, only kernel order differs.
EXPORT_TOLERANCE = 1e-4


class _BatchedProbabilities(nn.Module):
    """N x 3 x 224 x 224 -> N x 1: Triton's shape for a [1] output of a batching model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).unsqueeze(1)


class _PixelProbabilities(_BatchedProbabilities):
    """N x 3 x 224 x 224 uint8 -> N x 1: normalize_pixels' /255, -mean, /std in the graph, in its order."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CLIP_STD, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels.to(torch.float32) / 255.0 - self.mean) / self.std
        return super().forward(images)


@dataclass(frozen=True)
class ExportReport:
    model_dir: Path
    onnx_path: Path
    config_path: Path
    parameters: dict[str, str]
    max_abs_difference: float | None  # ONNX Runtime against PyTorch on sample images; None: not checked


def model_config_text(parameters: dict[str, str], *, model_name: str = MODEL_NAME, max_batch_size: int = 64,
                      preferred_batch_sizes: tuple[int, ...] = (), max_queue_delay_microseconds: int = 1000,
                      pixels: bool = False) -> str:
    """config.pbtxt for the exported model, written through Triton's own ModelConfig message."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    config = pb.ModelConfig(name=model_name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    model_input = (config.input.add(name=PIXEL_INPUT, data_type=pb.TYPE_UINT8) if pixels
                   else config.input.add(name=INPUT_NAME, data_type=pb.TYPE_FP32))
    model_input.dims.extend([3, IMAGE_SIZE, IMAGE_SIZE])
    probabilities = config.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32)
    probabilities.dims.append(1)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    preferred = [size for size in preferred_batch_sizes if size <= max_batch_size]
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return text_format.MessageToString(config)


def export_model_repository(model: nn.Module, repository: Path, *, model_name: str = MODEL_NAME,
                            max_batch_size: int = 64, preferred_batch_sizes: tuple[int, ...] = (),
                            check_images: int = 4, seed: int = 0, pixels: bool = False) -> ExportReport:
    """Write `repository/<model_name>/{config.pbtxt, 1/model.onnx}` from a loaded fp32 CPU model.

    With check_images > 0, ONNX Runtime scores that many seeded random images and the largest
    difference from PyTorch is reported; above EXPORT_TOLERANCE the export is refused (and removed).
    pixels: the model's input is uint8 `pixels`, normalised in the graph, instead of float32 `images`.
    """
    first = next(model.parameters())
    if first.dtype != torch.float32 or first.device.type != "cpu":
        raise DetectorError("export the model in fp32 on the CPU (--device cpu --precision fp32); "
                            "TensorRT makes its fp16 engine from that file")
    if max_batch_size < 1:
        raise DetectorError("max_batch_size must be at least 1")
    model_dir = repository / model_name
    onnx_path = model_dir / "1" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = (_PixelProbabilities if pixels else _BatchedProbabilities)(model).eval()
    input_name = PIXEL_INPUT if pixels else INPUT_NAME
    sample = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8 if pixels else torch.float32)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch_size, 2))
    with torch.no_grad():
        program = torch.onnx.export(wrapped, (sample,), input_names=[input_name], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, verbose=False)
    program.save(str(onnx_path))
    difference = _check(model, onnx_path, check_images, seed, pixels) if check_images > 0 else None
    if difference is not None and difference > EXPORT_TOLERANCE:
        onnx_path.unlink()
        raise DetectorError(f"the exported model differs from PyTorch by {difference:.2e} "
                            f"(more than {EXPORT_TOLERANCE:g}); not written")
    parameters = identity_parameters(model, "onnx")
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(model_config_text(parameters, model_name=model_name, max_batch_size=max_batch_size,
                                             preferred_batch_sizes=preferred_batch_sizes, pixels=pixels))
    return ExportReport(model_dir, onnx_path, config_path, parameters, difference)


def onnx_probabilities(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """Fake probabilities (N) of an exported model, through ONNX Runtime on the CPU: float32
    images, or uint8 pixels for a model exported with pixels."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    array = images if images.dtype == np.uint8 else images.astype(np.float32)
    return session.run([OUTPUT_NAME], {model_input.name: array})[0].reshape(-1)


def _check(model: nn.Module, onnx_path: Path, count: int, seed: int, pixels: bool) -> float:
    """The largest score difference, ONNX Runtime against PyTorch on the service's own preprocessing."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randint(0, 256, (count, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8)
    images = torch.from_numpy(normalize_pixels(sample.numpy()))
    with torch.no_grad():
        expected = model(images).numpy()
    sent = sample.numpy() if pixels else images.numpy()
    return float(np.abs(onnx_probabilities(onnx_path, sent) - expected).max())
