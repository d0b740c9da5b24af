"""The D³ detector: model, weights, batching inference engine and the `d3` model commands.

Names are imported lazily so `import api.detector` (and every `d3` command) stays cheap and
never touches torch or CUDA until a model is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DetectorConfig": "api.detector.config",
    "DetectorError": "api.detector.errors",
    "WeightsError": "api.detector.errors",
    "EngineNotReady": "api.detector.errors",
    "EngineOverloaded": "api.detector.errors",
    "EngineTimeout": "api.detector.errors",
    "InferenceError": "api.detector.errors",
    "InferenceEngine": "api.detector.engine",
    "D3Model": "api.detector.model",
    "D3Head": "api.detector.model",
    "build_model": "api.detector.factory",
    "shuffle_permutation": "api.detector.model",
    "shuffle_patches": "api.detector.model",
    "preprocess_image": "api.detector.preprocess",
    "verify_weights": "api.detector.weights",
}
__all__ = [
    "D3Head",
    "D3Model",
    "DetectorConfig",
    "DetectorError",
    "EngineNotReady",
    "EngineOverloaded",
    "EngineTimeout",
    "InferenceEngine",
    "InferenceError",
    "WeightsError",
    "build_model",
    "preprocess_image",
    "shuffle_patches",
    "shuffle_permutation",
    "verify_weights",
]

if TYPE_CHECKING:
    from api.detector.config import DetectorConfig
    from api.detector.engine import InferenceEngine
    from api.detector.errors import (
        DetectorError,
        EngineNotReady,
        EngineOverloaded,
        EngineTimeout,
        InferenceError,
        WeightsError,
    )
    from api.detector.factory import build_model
    from api.detector.model import D3Head, D3Model, shuffle_patches, shuffle_permutation
    from api.detector.preprocess import preprocess_image
    from api.detector.weights import verify_weights


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'api.detector' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
