"""Builds the D³ model a DetectorConfig names, the open_clip way: factory over model and weights.

`build_model` resolves the device and precision, plans and loads the weights (weights.py) into
the modules of model.py, and moves the result to its device. model.py and weights.py never
import this module, so there is no cycle: factory -> weights -> model.
"""

from __future__ import annotations

import torch

from api.detector import weights
from api.detector.config import DetectorConfig
from api.detector.errors import DetectorError
from api.detector.model import D3Model, build_head, build_visual, feature_dim, shuffle_permutation

PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when available, else cpu; cuda / cuda:N are checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise DetectorError(f"D3_DEVICE={spec} but CUDA is not available on this machine (use auto or cpu)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DetectorError(f"D3_DEVICE={spec} but only {torch.cuda.device_count()} CUDA device(s) exist")
        return device
    raise DetectorError(f"D3_DEVICE must be auto, cpu, cuda or cuda:N, got {spec!r}")


def resolve_precision(spec: str, device: torch.device) -> str:
    """auto -> fp32 on CPU, fp16 on CUDA; fp32/fp16/bf16 are taken as given."""
    if spec == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if spec not in PRECISIONS:
        raise DetectorError(f"D3_PRECISION must be auto, fp32, fp16 or bf16, got {spec!r}")
    return spec


def build_model(config: DetectorConfig) -> D3Model:
    """Build the D³ model a config describes: weights loaded, on its device, in its precision.

    Raises DetectorError (WeightsError for checkpoint problems) with an operator-facing message.
    """
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    plan = weights.resolve_weights(config)
    visual = build_visual(config.backbone, precision, init_seed=plan.backbone.seed)
    head = build_head(feature_dim(visual), seed=plan.head.seed or 0)
    weights.load_backbone(visual, plan.backbone, config.backbone)
    weights.load_head(head, plan.head)
    model = D3Model(visual, head, shuffle_permutation(config.shuffle_seed), backbone=config.backbone,
                    precision=precision, model_version=plan.model_version(precision), trained=plan.trained)
    return model.to(device).eval()
