"""The frozen backbone's two-view features from the inference tier, for `d3 features` (training.py).

`d3 serve-inference` binds its already-built D³ model a second time as the Triton model
`d3_features` (tier_detectors.features_binding): the same tower, weights and patch permutation,
only without the head. What travels:

- `images` FP32 (N x 3 x 224 x 224), preprocessed here exactly as in-process -> `features` FP32
  (N x 2 x dim), token 0 = the shuffled view (D3Model.features).
- the backbone identity (training.BACKBONE_KEYS: backbone, CLIP weights id, shuffle seed,
  precision) as `d3_<key>` parameters of the model's Triton config, beside the D³ model's own
  identity keys; a features file made through the tier carries the same meta as one made in-process
  with the same backbone, so `d3 train` takes either and either may resume the other.

The connection, the deadlines (D3_INFERENCE_TIMEOUT_S per call) and the failure mapping (down,
hung, overloaded, failing) are RemoteEngine's, inherited.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from api.detector.errors import DetectorError
from api.detector.remote_engine import RemoteConfig, RemoteEngine, TierModel
from api.detector.triton_server import identity_parameters

if TYPE_CHECKING:
    import torch

FEATURES_MODEL = "d3_features"
FEATURES_INPUT, FEATURES_OUTPUT = "images", "features"
DIM_KEY = "d3_feature_dim"


def features_parameters(model: Any, device: Any) -> dict[str, str]:
    """What the tier publishes of its features model (read back by FeaturesTierModel)."""
    from api.detector.model import feature_dim
    from api.detector.training import backbone_identity

    return {**identity_parameters(model, device),
            **{f"d3_{key}": str(value) for key, value in backbone_identity(model).items()},
            DIM_KEY: str(feature_dim(model.visual))}


@dataclass(frozen=True)
class FeaturesTierModel(TierModel):
    """The features model as the tier's config describes it: the D³ identity plus the backbone's."""

    identity: dict[str, str] = field(default_factory=dict)  # training.BACKBONE_KEYS -> value; {} if unpublished
    dim: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any], model_name: str) -> FeaturesTierModel:
        from api.detector.training import BACKBONE_KEYS

        base = TierModel.from_config(config, model_name)
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        identity = {key: params[f"d3_{key}"] for key in BACKBONE_KEYS if f"d3_{key}" in params}
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(TierModel)},
                   identity=identity if len(identity) == len(BACKBONE_KEYS) else {},
                   dim=int(params.get(DIM_KEY) or 0))


class RemoteFeatures(RemoteEngine):
    """A training.FeatureSource whose backbone runs in the tier; no monitor thread: `open()` once."""

    def __init__(self, url: str, timeout_s: float) -> None:
        super().__init__(RemoteConfig(url, model_name=FEATURES_MODEL, timeout_s=timeout_s))

    def _read_model(self, config: dict[str, Any]) -> FeaturesTierModel:
        return FeaturesTierModel.from_config(config, self.config.model_name)

    def open(self) -> dict[str, str]:
        """Reach the tier now (within the timeout) and return the backbone identity it publishes."""
        self.probe(self.config.timeout_s)
        model = self.tier_model
        assert isinstance(model, FeaturesTierModel)
        if not model.identity:
            raise DetectorError(f"the tier's model {FEATURES_MODEL!r} at {self.config.url} publishes no backbone "
                               "identity (d3_backbone, d3_clip_weights, d3_shuffle_seed, d3_precision)")
        return dict(model.identity)

    @property
    def identity(self) -> dict[str, str]:
        model = self.tier_model
        return dict(model.identity) if isinstance(model, FeaturesTierModel) else {}

    def features(self, x: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
        """N x 2 x dim fp32 features of preprocessed images (split only where the tier's max batch is smaller)."""
        batch = x.detach().to("cpu").float().contiguous().numpy()
        return self._bounded(len(batch), timeout, lambda deadline, bound: self._features(batch, deadline, bound))

    def _features(self, batch: Any, deadline: float, bound: float) -> torch.Tensor:
        import numpy as np
        import torch

        model = self._connected_model(deadline, bound)
        parts = []
        for start in range(0, len(batch), model.max_batch_size):
            response = self._send([(FEATURES_INPUT, batch[start:start + model.max_batch_size], "FP32")],
                                  [FEATURES_OUTPUT], deadline, bound)
            parts.append(response.as_numpy(FEATURES_OUTPUT))
        with self._lock:
            self._stats["images_processed"] += len(batch)
        return torch.from_numpy(np.concatenate(parts).reshape(len(batch), 2, -1).astype(np.float32, copy=False))
