"""The detector's own settings, decoupled from the service's `Settings` so tests can build one directly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # avoid importing the service config (and dotenv) just to type a parameter
    from api.config import Settings


IMAGE_SIZE = 224  # the model's input: 224x224 (ViT-L/14's resolution), the one definition of it
PATCH_SIZE = 14  # ViT-L/14's patch: a 16x16 grid of patches, what the patch shuffle permutes
# Said in every response (header and body) while the model has random weights.
UNTRAINED_WARNING = "model has random (untrained) weights: its verdicts mean nothing"


def cache_dir_path(cache_dir: str) -> Path:
    """D3_CACHE_DIR, or ~/.cache/d3 when it is empty: where every detector keeps downloaded weights."""
    return Path(os.path.expanduser(cache_dir)) if cache_dir else Path.home() / ".cache" / "d3"


@dataclass(frozen=True)
class DetectorConfig:
    backbone: str = "ViT-L-14-quickgelu"
    clip_weights: str = "openai"
    head_weights: str = ""
    shuffle_seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str = ""
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    queue_size: int = 1024
    infer_timeout_s: float = 120.0

    @property
    def resolved_cache_dir(self) -> Path:
        return cache_dir_path(self.cache_dir)

    @classmethod
    def from_settings(cls, settings: Settings) -> DetectorConfig:
        return cls(
            backbone=settings.d3_backbone,
            clip_weights=settings.d3_clip_weights,
            head_weights=settings.d3_head_weights,
            shuffle_seed=settings.d3_shuffle_seed,
            device=settings.d3_device,
            precision=settings.d3_precision,
            cache_dir=settings.d3_cache_dir,
            max_batch_size=settings.d3_max_batch_size,
            max_wait_ms=settings.d3_max_wait_ms,
            queue_size=settings.d3_queue_size,
            infer_timeout_s=settings.d3_infer_timeout_s,
        )
