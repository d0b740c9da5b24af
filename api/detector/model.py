"""Spec §2-§4: the D³ model = frozen CLIP image tower on two views + the attention head.

A pure module: the modules and the pieces they are built from, no weights, devices or settings
(api/detector/factory.py builds a loaded model from a DetectorConfig). Nothing here touches
CUDA at import time: Gunicorn forks after import, and a CUDA context does not survive a fork.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from api.detector.config import IMAGE_SIZE, PATCH_SIZE
from api.detector.errors import DetectorError

if TYPE_CHECKING:
    from open_clip.transformer import VisionTransformer

NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 256: the 16x16 grid of ViT-L/14's tokens
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

_registered = False


def open_clip_module() -> ModuleType:
    """open_clip, imported on first use with the project's configs registered.

    Importing it (and the torchvision it pulls in) takes seconds; the command-line tools, the
    checks and the API processes that never build a backbone should not pay that at start.
    """
    global _registered
    module = importlib.import_module("open_clip")
    if not _registered:
        module.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
    return module


def shuffle_permutation(seed: int) -> torch.Tensor:
    """The fixed patch permutation P of spec §2 (a LongTensor of 256 indices)."""
    return torch.randperm(NUM_PATCHES, generator=torch.Generator().manual_seed(seed))


def shuffle_patches(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Put the 14x14 patch from grid position perm[i] at position i (row-major), spec §2."""
    patches = F.unfold(x, PATCH_SIZE, stride=PATCH_SIZE)  # B x (3*14*14) x 256
    return F.fold(patches[:, :, perm], (IMAGE_SIZE, IMAGE_SIZE), PATCH_SIZE, stride=PATCH_SIZE)


class D3Head(nn.Module):
    """Spec §4: self-attention over the two view features, softmax over dim 1, then Linear(2d, 1)."""

    def __init__(self, dim: int = 1024) -> None:
        super().__init__()
        self.dim = dim
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.fc = nn.Linear(2 * dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: B x 2 x dim (token 0 = shuffled view, token 1 = original) -> B logits."""
        q, k, v = self.query(features), self.key(features), self.value(features)
        # dim=1 (the query axis), not the last axis: that is what the released head was trained with.
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.dim), dim=1)
        return self.fc((attn @ v).flatten(1)).squeeze(1)


class D3Model(nn.Module):
    """x (B x 3 x 224 x 224, CLIP-normalised) -> B fake probabilities."""

    def __init__(self, visual: nn.Module, head: D3Head, perm: torch.Tensor, *, backbone: str = "",
                 precision: str = "fp32", model_version: str = "", trained: bool = False) -> None:
        super().__init__()
        self.visual = visual
        self.head = head
        self.register_buffer("perm", perm.clone(), persistent=False)
        self.backbone = backbone
        self.precision = precision
        self.model_version = model_version
        self.trained = trained

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B x 2 x dim fp32 features, token 0 = shuffled view. Both views run as one 2B batch."""
        batch = x.shape[0]
        views = torch.cat([shuffle_patches(x, self.perm), x])
        feats = self.visual(views.to(self.visual.conv1.weight.dtype)).float()
        return torch.stack([feats[:batch], feats[batch:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.features(x.float())))


class _DropOpenClipRandomInitWarning(logging.Filter):
    # open_clip logs through the root logger while building: its INFO lines (e.g. its own bicubic
    # preprocessing, which we do not use) and its "initialized randomly" warning (we load our own
    # weights next) only mislead operators.
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.levelno < logging.WARNING:
            return False
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    root, quiet = logging.getLogger(), _DropOpenClipRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def backbone_config(backbone: str) -> dict:
    """The open_clip model config for a backbone name, or a DetectorError naming the known ones."""
    open_clip = open_clip_module()
    cfg = open_clip.get_model_config(backbone)
    if cfg is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT-L-14", "d3-")))
        raise DetectorError(f"unknown backbone {backbone!r} (D3_BACKBONE); e.g. {known}")
    return cfg


def build_visual(backbone: str, precision: str = "fp32", *, init_seed: int | None = 0) -> VisionTransformer:
    """The open_clip image tower of `backbone` with proj=None (penultimate 1024-d feature, spec §3).

    init_seed=None builds it on the meta device (no memory, no init): for weights loaded afterwards
    with `materialize_visual`. Otherwise it is randomly initialised from that seed, on the CPU.
    """
    cfg = backbone_config(backbone)
    open_clip = open_clip_module()
    from open_clip.transformer import VisionTransformer

    device = "meta" if init_seed is None else "cpu"
    # open_clip's fp16/bf16 keep LayerNorm and embeddings in fp32, as OpenAI's CLIP does.
    with _quiet_open_clip(), torch.random.fork_rng(devices=[]), torch.device(device):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        clip = open_clip.create_model(backbone, precision=precision, device=device)
    visual = clip.visual
    del clip  # only the image tower is kept; the text tower is dropped here
    if not isinstance(visual, VisionTransformer) or tuple(visual.patch_size) != (PATCH_SIZE, PATCH_SIZE) \
            or tuple(visual.image_size) != (IMAGE_SIZE, IMAGE_SIZE) or visual.attn_pool is not None:
        raise DetectorError(f"backbone {backbone!r} must be a plain ViT at 224 px with 14 px patches "
                            "(the 16x16 grid the patch shuffle uses)")
    _check_activation(visual, backbone, quick_gelu=bool(cfg.get("quick_gelu", False)))
    visual.proj = None  # the class token after ln_post, before the projection
    visual.eval().requires_grad_(False)
    return visual


def _check_activation(visual: nn.Module, backbone: str, *, quick_gelu: bool) -> None:
    # OpenAI weights need QuickGELU; exact GELU shifts features by ~5 % and open_clip only warns.
    from open_clip.transformer import QuickGELU

    acts = {type(block.mlp.gelu) for block in visual.transformer.resblocks}
    if quick_gelu and acts != {QuickGELU}:
        raise DetectorError(f"backbone {backbone!r} asks for QuickGELU but open_clip built {acts}")


def uses_quick_gelu(visual: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return all(isinstance(block.mlp.gelu, QuickGELU) for block in visual.transformer.resblocks)


def materialize_visual(visual: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a (possibly meta) visual tower real storage and fill it from a checked state_dict."""
    if any(p.is_meta for p in visual.parameters()):
        visual.to_empty(device="cpu")
    visual.load_state_dict(state, strict=True)


def build_head(dim: int, seed: int = 0) -> D3Head:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return D3Head(dim).eval().requires_grad_(False)


def feature_dim(visual: VisionTransformer) -> int:
    return int(visual.ln_post.normalized_shape[0])
