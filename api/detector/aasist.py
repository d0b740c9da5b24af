"""AASIST (Jung et al., ICASSP 2022): spoofed-speech detection on the raw 16 kHz waveform.

The architecture is the authors' released one (clovaai/aasist, models/AASIST.py at a04c986),
module for module and with the same parameter names, so their checkpoints load unchanged
(docs/AASIST.md walks through every step). Kept on purpose, because the released weights were
trained with them:
- the residual blocks 2-6 own a `bn1` that their forward computes and then discards: conv1
  takes the raw block input (bn1 is loaded, never applied);
- the fixed sinc filterbank is rebuilt at start-up (it is not in the checkpoint), with the
  authors' float32 arithmetic;
- graph pooling multiplies the nodes by their sigmoid scores and keeps `topk` (descending) order,
  and the two branches are merged node by node in that order;
- the heterogeneous layers share one cross-type attention vector (w12) for both directions.

The score is the authors': logits[:, 1], the bona fide logit (higher = more bona fide). The
service's fake probability is sigmoid(-score): a monotone map, so every ranking metric (EER,
t-DCF, AUC) is the authors'; threshold 0.5 means "bona fide logit below 0".
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from api.detector.errors import DetectorError, WeightsError
from api.detector.interface import Detector, Score
from api.detector.weights import (
    WeightsRef,
    download_if_missing,
    file_sha256,
    load_checked,
    resolve_checkpoint_setting,
)

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 64_600  # the authors' nb_samp: 4.0375 s
AUTHORS_WEIGHTS_URL = {
    "AASIST": "https://github.com/clovaai/aasist/raw/main/models/weights/AASIST.pth",
    "AASIST-L": "https://github.com/clovaai/aasist/raw/main/models/weights/AASIST-L.pth",
}


@dataclass(frozen=True)
class AasistArch:
    """The authors' `model_config` (config/AASIST.conf, AASIST-L.conf), plus our tiny test one."""

    name: str
    filts: tuple  # (n_sinc_filters, [in, out] x 4): blocks use filts[1], [2], [3], [4], [4], [4]
    gat_dims: tuple[int, int]
    pool_ratios: tuple[float, ...]
    temperatures: tuple[float, ...]
    first_conv: int = 128
    nb_samp: int = WINDOW_SAMPLES

    @property
    def bands(self) -> int:
        return self.filts[0] // 3  # the 3x3 max-pool over the filter axis (70 filters -> 23)


ARCHITECTURES = {
    "AASIST": AasistArch("AASIST", (70, (1, 32), (32, 32), (32, 64), (64, 64)), (64, 32),
                         (0.5, 0.7, 0.5, 0.5), (2.0, 2.0, 100.0, 100.0)),
    "AASIST-L": AasistArch("AASIST-L", (70, (1, 32), (32, 32), (32, 24), (24, 24)), (24, 32),
                           (0.4, 0.5, 0.7, 0.5), (2.0, 2.0, 100.0, 100.0)),
    # Same graph and front end, far fewer filters and channels: seconds on a CPU, for tests and demos.
    "aasist-tiny": AasistArch("aasist-tiny", (20, (1, 8), (8, 8), (8, 16), (16, 16)), (16, 8),
                              (0.5, 0.7, 0.5, 0.5), (2.0, 2.0, 100.0, 100.0)),
}


# ------------------------------------------------------------------------------- front end
def mel_band_edges(n_filters: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """n+1 band edges in Hz, equally spaced in mel between 0 and the Nyquist frequency (authors' CONV)."""
    f = int(sample_rate / 2) * np.linspace(0, 1, int(512 / 2) + 1)
    mel = 2595 * np.log10(1 + f / 700)
    edges_mel = np.linspace(np.min(mel), np.max(mel), n_filters + 1)
    return 700 * (10 ** (edges_mel / 2595) - 1)


def sinc_filterbank(n_filters: int, kernel_size: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """(n_filters, taps) Hamming-windowed band-pass filters, taps = kernel_size bumped to odd.

    The same expressions, in the same dtypes, as the authors' CONV.__init__: the tap grid is a
    float32 tensor, so the sinc arguments are float32 (a float64 build differs by ~1e-7 per tap).
    """
    taps = kernel_size + 1 if kernel_size % 2 == 0 else kernel_size
    edges = mel_band_edges(n_filters, sample_rate)
    hsupp = torch.arange(-(taps - 1) / 2, (taps - 1) / 2 + 1)
    bank = torch.zeros(n_filters, taps)
    window = torch.Tensor(np.hamming(taps))
    for i in range(n_filters):
        fmin, fmax = edges[i], edges[i + 1]
        high = (2 * fmax / sample_rate) * np.sinc(2 * fmax * hsupp / sample_rate)
        low = (2 * fmin / sample_rate) * np.sinc(2 * fmin * hsupp / sample_rate)
        bank[i, :] = window * torch.Tensor(high - low)
    return bank


class SincConv(nn.Module):
    """The fixed sinc filterbank: conv1d, stride 1, no padding, no bias. No trainable state."""

    def __init__(self, n_filters: int, kernel_size: int) -> None:
        super().__init__()
        # Not persistent: the authors' checkpoints do not carry the filters (they are rebuilt).
        self.register_buffer("band_pass", sinc_filterbank(n_filters, kernel_size).unsqueeze(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.band_pass.to(x.dtype))


# ------------------------------------------------------------------------------- encoder
class ResidualBlock(nn.Module):
    """The authors' Residual_block. Blocks after the first own a bn1 that forward never applies."""

    def __init__(self, nb_filts: Sequence[int], first: bool = False) -> None:
        super().__init__()
        self.first = first
        if not first:
            self.bn1 = nn.BatchNorm2d(nb_filts[0])  # loaded, unused: the authors' forward discards it
        self.conv1 = nn.Conv2d(nb_filts[0], nb_filts[1], kernel_size=(2, 3), padding=(1, 1), stride=1)
        self.bn2 = nn.BatchNorm2d(nb_filts[1])
        self.conv2 = nn.Conv2d(nb_filts[1], nb_filts[1], kernel_size=(2, 3), padding=(0, 1), stride=1)
        self.downsample = nb_filts[0] != nb_filts[1]
        if self.downsample:
            self.conv_downsample = nn.Conv2d(nb_filts[0], nb_filts[1], padding=(0, 1), kernel_size=(1, 3), stride=1)
        self.mp = nn.MaxPool2d((1, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.selu(self.bn2(self.conv1(x))))  # conv1 on x itself: the authors' bug, kept
        identity = self.conv_downsample(x) if self.downsample else x
        return self.mp(out + identity)


# ------------------------------------------------------------------------------- graph layers
def _pairwise(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N, D) with [b, i, j] = x_i * x_j."""
    n = x.size(1)
    expanded = x.unsqueeze(2).expand(-1, -1, n, -1)
    return expanded * expanded.transpose(1, 2)


def _bn_nodes(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    shape = x.size()
    return bn(x.reshape(-1, shape[-1])).view(shape)


class GraphAttentionLayer(nn.Module):
    """GAT: attention from tanh(W_a(x_i * x_j)) . w, softmax over neighbours j at temperature tau."""

    def __init__(self, in_dim: int, out_dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_weight = nn.Parameter(torch.empty(out_dim, 1))
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.temp = temperature
        nn.init.xavier_normal_(self.att_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.matmul(torch.tanh(self.att_proj(_pairwise(x))), self.att_weight) / self.temp
        att = F.softmax(att, dim=-2).squeeze(-1)  # dim -2 of (B, N, N, 1): the neighbour axis j
        out = self.proj_with_att(torch.matmul(att, x)) + self.proj_without_att(x)
        return F.selu(_bn_nodes(self.bn, out))


class HtrgGraphAttentionLayer(nn.Module):
    """HS-GAT over temporal (type 1) and spectral (type 2) nodes plus a master node."""

    def __init__(self, in_dim: int, out_dim: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.proj_type1 = nn.Linear(in_dim, in_dim)
        self.proj_type2 = nn.Linear(in_dim, in_dim)
        self.att_proj = nn.Linear(in_dim, out_dim)
        self.att_projM = nn.Linear(in_dim, out_dim)
        self.att_weight11 = nn.Parameter(torch.empty(out_dim, 1))
        self.att_weight22 = nn.Parameter(torch.empty(out_dim, 1))
        self.att_weight12 = nn.Parameter(torch.empty(out_dim, 1))
        self.att_weightM = nn.Parameter(torch.empty(out_dim, 1))
        self.proj_with_att = nn.Linear(in_dim, out_dim)
        self.proj_without_att = nn.Linear(in_dim, out_dim)
        self.proj_with_attM = nn.Linear(in_dim, out_dim)
        self.proj_without_attM = nn.Linear(in_dim, out_dim)
        self.bn = nn.BatchNorm1d(out_dim)
        self.temp = temperature
        for weight in (self.att_weight11, self.att_weight22, self.att_weight12, self.att_weightM):
            nn.init.xavier_normal_(weight)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, master: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n1, n2 = x1.size(1), x2.size(1)
        x = torch.cat([self.proj_type1(x1), self.proj_type2(x2)], dim=1)
        pre = torch.tanh(self.att_proj(_pairwise(x)))
        board = torch.zeros_like(pre[:, :, :, :1])
        board[:, :n1, :n1] = pre[:, :n1, :n1] @ self.att_weight11
        board[:, n1:, n1:] = pre[:, n1:, n1:] @ self.att_weight22
        board[:, :n1, n1:] = pre[:, :n1, n1:] @ self.att_weight12  # one w12 for both cross blocks
        board[:, n1:, :n1] = pre[:, n1:, :n1] @ self.att_weight12
        att = F.softmax(board / self.temp, dim=-2).squeeze(-1)
        # The master reads the type-projected nodes, before the node update; no BN, no activation.
        att_m = F.softmax(torch.matmul(torch.tanh(self.att_projM(x * master)), self.att_weightM) / self.temp, dim=-2)
        master = self.proj_with_attM(torch.matmul(att_m.squeeze(-1).unsqueeze(1), x)) + self.proj_without_attM(master)
        out = F.selu(_bn_nodes(self.bn, self.proj_with_att(torch.matmul(att, x)) + self.proj_without_att(x)))
        return out.narrow(1, 0, n1), out.narrow(1, n1, n2), master


class GraphPool(nn.Module):
    """Keep the top max(int(N*k), 1) nodes by sigmoid score, multiplied by it, in topk order."""

    def __init__(self, k: float, in_dim: int) -> None:
        super().__init__()
        self.k = k
        self.proj = nn.Linear(in_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        scores = torch.sigmoid(self.proj(h))
        keep = max(int(h.size(1) * self.k), 1)
        _, idx = torch.topk(scores, keep, dim=1)
        return torch.gather(h * scores, 1, idx.expand(-1, -1, h.size(2)))


# ------------------------------------------------------------------------------- the model
class AASIST(nn.Module):
    """x (B x 64,600 float32, 16 kHz) -> (last hidden B x 5*g1, logits B x 2), as the authors' Model."""

    def __init__(self, arch: AasistArch) -> None:
        super().__init__()
        self.arch = arch
        filts, gat, pool, temp = arch.filts, arch.gat_dims, arch.pool_ratios, arch.temperatures
        self.conv_time = SincConv(filts[0], arch.first_conv)
        self.first_bn = nn.BatchNorm2d(1)
        self.encoder = nn.Sequential(
            nn.Sequential(ResidualBlock(filts[1], first=True)),
            nn.Sequential(ResidualBlock(filts[2])),
            nn.Sequential(ResidualBlock(filts[3])),
            nn.Sequential(ResidualBlock(filts[4])),
            nn.Sequential(ResidualBlock(filts[4])),
            nn.Sequential(ResidualBlock(filts[4])))
        channels = filts[-1][-1]
        self.pos_S = nn.Parameter(torch.randn(1, arch.bands, channels))
        self.master1 = nn.Parameter(torch.randn(1, 1, gat[0]))
        self.master2 = nn.Parameter(torch.randn(1, 1, gat[0]))
        self.GAT_layer_S = GraphAttentionLayer(channels, gat[0], temperature=temp[0])
        self.GAT_layer_T = GraphAttentionLayer(channels, gat[0], temperature=temp[1])
        self.HtrgGAT_layer_ST11 = HtrgGraphAttentionLayer(gat[0], gat[1], temperature=temp[2])
        self.HtrgGAT_layer_ST12 = HtrgGraphAttentionLayer(gat[1], gat[1], temperature=temp[2])
        self.HtrgGAT_layer_ST21 = HtrgGraphAttentionLayer(gat[0], gat[1], temperature=temp[2])
        self.HtrgGAT_layer_ST22 = HtrgGraphAttentionLayer(gat[1], gat[1], temperature=temp[2])
        self.pool_S = GraphPool(pool[0], gat[0])
        self.pool_T = GraphPool(pool[1], gat[0])
        self.pool_hS1 = GraphPool(pool[2], gat[1])
        self.pool_hT1 = GraphPool(pool[2], gat[1])
        self.pool_hS2 = GraphPool(pool[2], gat[1])
        self.pool_hT2 = GraphPool(pool[2], gat[1])
        self.out_layer = nn.Linear(5 * gat[1], 2)

    def _branch(self, t: torch.Tensor, s: torch.Tensor, master: torch.Tensor, first: nn.Module,
                second: nn.Module, pool_s: nn.Module, pool_t: nn.Module
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t1, s1, m1 = first(t, s, master)
        s1, t1 = pool_s(s1), pool_t(t1)
        dt, ds, dm = second(t1, s1, m1)
        return t1 + dt, s1 + ds, m1 + dm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv_time(x.unsqueeze(1)).unsqueeze(1)
        x = F.selu(self.first_bn(F.max_pool2d(torch.abs(x), (3, 3))))
        e = self.encoder(x)  # (B, C, bands, time)
        e_s = torch.max(torch.abs(e), dim=3).values.transpose(1, 2) + self.pos_S
        out_s = self.pool_S(self.GAT_layer_S(e_s))
        e_t = torch.max(torch.abs(e), dim=2).values.transpose(1, 2)
        out_t = self.pool_T(self.GAT_layer_T(e_t))
        t1, s1, m1 = self._branch(out_t, out_s, self.master1, self.HtrgGAT_layer_ST11, self.HtrgGAT_layer_ST12,
                                  self.pool_hS1, self.pool_hT1)
        t2, s2, m2 = self._branch(out_t, out_s, self.master2, self.HtrgGAT_layer_ST21, self.HtrgGAT_layer_ST22,
                                  self.pool_hS2, self.pool_hT2)
        t, s, m = torch.max(t1, t2), torch.max(s1, s2), torch.max(m1, m2)
        hidden = torch.cat([torch.abs(t).max(dim=1).values, t.mean(dim=1),
                            torch.abs(s).max(dim=1).values, s.mean(dim=1), m.squeeze(1)], dim=1)
        return hidden, self.out_layer(hidden)


# ------------------------------------------------------------------------------- input and output
def fix_length(samples: np.ndarray, length: int = WINDOW_SAMPLES) -> np.ndarray:
    """The authors' eval-time `pad`: the first `length` samples, or a short clip tiled end to end."""
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError("expected a non-empty mono waveform")
    if samples.shape[0] >= length:
        return samples[:length]
    repeats = int(length / samples.shape[0]) + 1
    return np.tile(samples, (1, repeats))[:, :length][0]


def window_starts(n_samples: int, hop: int, length: int = WINDOW_SAMPLES) -> list[int]:
    """Where the scoring windows of a recording start.

    One window (the authors' pad) when the recording is at most one window long; otherwise windows
    every `hop` samples while they fit, plus one window ending at the last sample when the tail is
    not covered, so every window is real audio (never tiled) and every sample is scored.
    """
    if n_samples <= length:
        return [0]
    starts = list(range(0, n_samples - length + 1, hop))
    if starts[-1] + length < n_samples:
        starts.append(n_samples - length)
    return starts


def fake_probability(bona_fide_logit: float) -> float:
    """sigmoid(-score): monotone in the authors' score, so their EER/t-DCF/AUC are unchanged."""
    return 1.0 / (1.0 + math.exp(bona_fide_logit)) if bona_fide_logit > -700 else 1.0


def scores_from_logits(logits: Sequence[Sequence[float]]) -> list[Score]:
    """One Score per (spoof, bona fide) logit row, here or from the inference tier: the score is the
    authors', the bona fide logit."""
    return [Score(score=float(row[1]), fake_probability=fake_probability(float(row[1])),
                  detail={"logits": {"spoof": float(row[0]), "bona_fide": float(row[1])}}) for row in logits]


# ------------------------------------------------------------------------------- settings and weights
@dataclass(frozen=True)
class AasistConfig:
    model: str = "AASIST"  # AASIST, AASIST-L or aasist-tiny
    weights: str = ""  # file, https URL, random:<seed>; empty = the authors' checkpoint in the cache
    device: str = "auto"
    cache_dir: str = ""
    max_batch_size: int = 8

    @property
    def resolved_cache_dir(self) -> Path:
        import os

        return Path(os.path.expanduser(self.cache_dir)) if self.cache_dir else Path.home() / ".cache" / "d3"

    @property
    def arch(self) -> AasistArch:
        if self.model not in ARCHITECTURES:
            raise DetectorError(f"AASIST_MODEL must be one of {', '.join(ARCHITECTURES)}, got {self.model!r}")
        return ARCHITECTURES[self.model]

    @classmethod
    def from_settings(cls, settings: Any) -> AasistConfig:
        return cls(model=settings.aasist_model, weights=settings.aasist_weights, device=settings.aasist_device,
                   cache_dir=settings.d3_cache_dir, max_batch_size=settings.aasist_max_batch_size)


def default_weights_path(config: AasistConfig) -> Path:
    """Where `d3 fetch-weights` (or a URL setting) puts the authors' checkpoint of this architecture."""
    return config.resolved_cache_dir / "aasist" / f"{config.model}.pth"


def resolve_weights(config: AasistConfig) -> WeightsRef:
    import dataclasses

    ref = resolve_checkpoint_setting(
        "AASIST", "AASIST_WEIGHTS", config.weights, default_path=default_weights_path(config),
        url_path=lambda url: config.resolved_cache_dir / "aasist" / Path(url.split("?")[0]).name)
    url = AUTHORS_WEIGHTS_URL.get(config.model, "")
    fix = (f"place the authors' {config.model}.pth there (from {url}), or set AASIST_WEIGHTS to a checkpoint "
           "file or that https URL (fetched once)") if url else "set AASIST_WEIGHTS to a checkpoint file"
    return dataclasses.replace(ref, fix=fix)


def checkpoint_state(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The authors' layout: a plain state_dict; a DataParallel `module.` prefix is also accepted."""
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"AASIST weights {path}: expected a plain state_dict of tensors, as the authors "
                           f"publish, found {type(obj).__name__}")
    if obj and all(str(k).startswith("module.") for k in obj):
        obj = {str(k).removeprefix("module."): v for k, v in obj.items()}
    return {str(k): v for k, v in obj.items()}


def build_aasist(arch: AasistArch, ref: WeightsRef) -> AASIST:
    """The model with its weights: random:<seed> (seeded init) or the checkpoint, checked strictly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ref.seed or 0)
        model = AASIST(arch)
    load_checked(model, ref, "AASIST", checkpoint_state)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------- the detector
@dataclass
class AasistDetector(Detector):
    """Scores 64,600-sample windows; `predict` takes mono float32 arrays of any non-zero length
    (each fixed to one window with the authors' pad)."""

    model: AASIST
    model_version: str
    trained: bool
    weights: tuple[WeightsRef, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_batch_size: int = 8
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    modality = "audio"
    name = "aasist"
    sample_rate = SAMPLE_RATE
    window_samples = WINDOW_SAMPLES

    def logits(self, windows: Sequence[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack([fix_length(np.asarray(w, dtype=np.float32)) for w in windows]))
        out = []
        # One forward at a time per process: a batch already uses every core on a CPU.
        with self._lock, torch.inference_mode():
            for start in range(0, len(batch), self.max_batch_size):
                _, logits = self.model(batch[start:start + self.max_batch_size].to(self.device))
                out.append(logits.float().cpu())
        return torch.cat(out)

    def predict(self, inputs: Sequence[np.ndarray]) -> list[Score]:
        if not inputs:
            return []
        return scores_from_logits(self.logits(inputs).tolist())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "architecture": self.model.arch.name, "device": str(self.device),
                "sample_rate": SAMPLE_RATE, "window_samples": WINDOW_SAMPLES,
                "score": "bona fide logit (logits[:, 1]); fake_probability = sigmoid(-score)"}


def model_version(arch: AasistArch, ref: WeightsRef) -> str:
    """e.g. aasist/AASIST/sha256:51d2d9cf0738 (or random:<seed>)."""
    if ref.kind == "random":
        identity = f"random:{ref.seed}"
    else:
        assert ref.path is not None
        identity = f"sha256:{file_sha256(ref.path)[:12]}"
    return f"aasist/{arch.name}/{identity}/fp32"


def load_detector(config: AasistConfig) -> AasistDetector:
    """Resolve, (download when a URL and online), load and place the detector a config describes."""
    from api.detector.factory import resolve_device

    arch = config.arch
    ref = download_if_missing(resolve_weights(config))
    model = build_aasist(arch, ref)
    device = resolve_device(config.device)
    if device.type == "cuda":
        # Parity with the authors' fp32 (V100): no TF32 convolutions on Ampere and later.
        torch.backends.cudnn.allow_tf32 = False
    return AasistDetector(model=model.to(device), model_version=model_version(arch, ref),
                          trained=ref.kind != "random", weights=(ref,), device=device,
                          max_batch_size=config.max_batch_size)
