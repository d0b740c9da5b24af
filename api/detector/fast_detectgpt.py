"""Fast-DetectGPT (Bao et al., ICLR 2024): zero-shot machine-text detection by conditional
probability curvature, with a sampling (reference) and a scoring causal LM from `transformers`.

What is computed (docs/FAST_DETECTGPT.md has every step and the authors' quirks):
- the raw text through the scoring model's tokenizer (default special tokens, no BOS for GPT-2
  BPE models); labels = ids[1:], logits = output[:-1], so the first token is never scored;
- both vocabularies cut to the shared size before any softmax; l = log_softmax(scoring logits),
  q = softmax(sampling logits); per position ll = l[y], mu = sum q*l, var = sum q*l^2 - mu^2;
- crit = (sum ll - sum mu) / sqrt(sum var): the analytic criterion, summed once over the text;
- p(machine) = N(crit; mu1, s1) / (N(crit; mu0, s0) + N(crit; mu1, s1)) with the authors'
  per-pair constants (their display-only probability; crit is reported beside it).
Texts longer than the models' context are cut into chunks that overlap by one token (each token
but the very first is scored exactly once) and the three sums are pooled over the chunks, so a
long text's criterion is the same formula over all its scored tokens. Chunks of many texts run as
one right-padded batch with the pads masked out of all three sums.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from api.detector.config import cache_dir_path
from api.detector.errors import DetectorError, WeightsError
from api.detector.interface import Detector, InputTooLong, InputTooShort, Score
from api.detector.weights import WeightsRef, find_in_hf_cache, hf_cache_dirs_under, offline_mode

DEFAULT_SCORING = "EleutherAI/gpt-neo-2.7B"
DEFAULT_SAMPLING = "EleutherAI/gpt-j-6B@float16"  # the paper's black-box pair; GPT-J's fp16 branch

# scripts/local_infer.py `distrib_params`, keyed "{sampling}_{scoring}": (mu0, sigma0, mu1, sigma1).
CALIBRATIONS: dict[str, tuple[float, float, float, float]] = {
    "gpt-j-6B_gpt-neo-2.7B": (0.2713, 0.9366, 2.2334, 1.8731),
    "gpt-neo-2.7B_gpt-neo-2.7B": (-0.2489, 0.9968, 1.8983, 1.9935),
    "falcon-7b_falcon-7b-instruct": (-0.0707, 0.9520, 2.9306, 1.9039),
    "llama3-8b_llama3-8b-instruct": (0.1603, 1.0791, 2.4686, 2.1582),
}
DEFAULT_CALIBRATION = "gpt-j-6B_gpt-neo-2.7B"
_HF_WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.bin")


# ------------------------------------------------------------------------------- the criterion
def criterion_sums(sampling_logits: torch.Tensor, scoring_logits: torch.Tensor, labels: torch.Tensor,
                   mask: torch.Tensor | None = None, block: int = 128
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (sum ll, sum mu, sum var) over the masked-in positions, in float64.

    sampling_logits (B, T, V_r), scoring_logits (B, T, V_s), labels (B, T), mask (B, T) or None.
    Both vocabularies are cut to min(V_r, V_s) before the softmax, as the authors do.
    float64, `block` positions at a time (bounded memory): var = E[l^2] - mu^2 cancels badly in
    float32 (l^2 ~ 200 over a 50k vocabulary: ~1e-4 in crit); the authors' fp16/fp32 sums are
    therefore not reproduced bit for bit, only to their own rounding (docs/FAST_DETECTGPT.md).
    """
    vocab = min(sampling_logits.size(-1), scoring_logits.size(-1))
    rows, steps = labels.shape
    totals = torch.zeros(3, rows, dtype=torch.float64, device=labels.device)
    weight_all = torch.ones(rows, steps, dtype=torch.float64, device=labels.device) if mask is None \
        else mask.to(torch.float64)
    for first in range(0, steps, block):
        part = slice(first, first + block)
        log_p = F.log_softmax(scoring_logits[:, part, :vocab].double(), dim=-1)
        q = F.softmax(sampling_logits[:, part, :vocab].double(), dim=-1)
        ll = log_p.gather(-1, labels[:, part].unsqueeze(-1)).squeeze(-1)
        mu = (q * log_p).sum(dim=-1)
        var = (q * log_p.square()).sum(dim=-1) - mu.square()
        weight = weight_all[:, part]
        totals += torch.stack([(ll * weight).sum(1), (mu * weight).sum(1), (var * weight).sum(1)])
    return totals[0], totals[1], totals[2]


def criterion(ll_sum: float, mu_sum: float, var_sum: float) -> float:
    """(sum ll - sum mu) / sqrt(sum var): higher = more machine-like."""
    return (ll_sum - mu_sum) / math.sqrt(var_sum)


def machine_probability(crit: float, calibration: tuple[float, float, float, float]) -> float:
    """The authors' compute_prob_norm: two Gaussians with equal priors (not monotone in crit)."""
    from scipy.stats import norm

    mu0, sigma0, mu1, sigma1 = calibration
    human, machine = norm.pdf(crit, loc=mu0, scale=sigma0), norm.pdf(crit, loc=mu1, scale=sigma1)
    total = human + machine
    return float(machine / total) if total > 0 else float(crit > mu1)


# ------------------------------------------------------------------------------- settings and weights
@dataclass(frozen=True)
class TextDetectorConfig:
    scoring_model: str = DEFAULT_SCORING
    sampling_model: str = DEFAULT_SAMPLING
    calibration: str = ""  # a CALIBRATIONS key; empty = from the pair's names
    device: str = "auto"
    precision: str = "auto"
    cache_dir: str = ""
    min_tokens: int = 32
    max_tokens: int = 16_384
    max_chars: int = 100_000
    chunk_tokens: int = 0  # 0 = the models' context length
    max_batch_size: int = 4

    @property
    def resolved_cache_dir(self) -> Path:
        return cache_dir_path(self.cache_dir)

    @classmethod
    def from_settings(cls, settings: Any) -> TextDetectorConfig:
        return cls(scoring_model=settings.text_scoring_model, sampling_model=settings.text_sampling_model,
                   calibration=settings.text_calibration, device=settings.text_device,
                   precision=settings.text_precision, cache_dir=settings.d3_cache_dir,
                   min_tokens=settings.text_min_tokens, max_tokens=settings.text_max_tokens,
                   max_chars=settings.text_max_chars, chunk_tokens=settings.text_chunk_tokens,
                   max_batch_size=settings.text_max_batch_size)


def split_revision(spec: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); no '@' -> (spec, None)."""
    name, _, revision = spec.partition("@")
    return name, revision or None


def short_name(spec: str) -> str:
    """What the authors call a model in their constants: the repo's last part ('gpt-j-6B')."""
    return split_revision(spec)[0].rstrip("/").rsplit("/", 1)[-1]


def resolve_lm(spec: str, setting: str, cache_root: Path) -> WeightsRef:
    """random:<seed>, a local model folder (config.json inside), or a hub repo id in a Hugging Face cache.

    The ref's path is the folder's config.json (present = the model is there to load).
    """
    from api.detector.weights import _random_seed

    spec = spec.strip()
    part = setting.lower().removeprefix("text_").replace("_", " ")
    if not spec:
        raise WeightsError(f"{setting} is empty: use a Hugging Face model name, a model folder or random:<seed>")
    seed = _random_seed(spec)
    if seed is not None:
        return WeightsRef(part, setting, spec, "random", seed=seed)
    local = Path(os.path.expanduser(spec))
    if local.is_dir() or spec.startswith(("/", ".", "~")):
        config = local / "config.json"
        return WeightsRef(part, setting, spec, "file", path=config, looked_in=(str(config),),
                          fix=f"point {setting} at a folder saved by save_pretrained (config.json, weights, tokenizer)")
    repo_id, revision = split_revision(spec)
    dirs = hf_cache_dirs_under(cache_root)
    found = find_in_hf_cache(repo_id, ("config.json",), dirs, revision=revision)
    looked = tuple(str(d / f"models--{repo_id.replace('/', '--')}") for d in dirs)
    fix = (f"download it into the Hugging Face cache (huggingface-cli download {repo_id}"
           f"{f' --revision {revision}' if revision else ''}), or set {setting} to a local model folder")
    return WeightsRef(part, setting, spec, "hub", path=found, looked_in=looked, fix=fix)


def download_lm(ref: WeightsRef, cache_root: Path) -> Path:
    """Download a hub model into <cache>/huggingface (for `d3 fetch-weights`); refused offline."""
    from huggingface_hub import snapshot_download

    from api.detector.weights import _resolves

    repo_id, revision = split_revision(ref.spec)
    if offline_mode():
        raise WeightsError(f"offline (HF_HUB_OFFLINE is set): cannot download {repo_id} from Hugging Face")
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if not _resolves(endpoint):
        raise WeightsError(f"this machine looks offline: {repo_id} cannot be downloaded")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=str(cache_root / "huggingface"),
                                   allow_patterns=list(_HF_WEIGHT_PATTERNS))
    except Exception as exc:  # network, missing repo or revision
        raise WeightsError(f"could not download {repo_id} from Hugging Face: {type(exc).__name__}: {exc}") from exc
    return Path(folder)


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"  # the authors load GPT-Neo/J in fp16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_lm(ref: WeightsRef, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) from a resolved folder: local files only, no remote code.

    safetensors when the folder has them; a pytorch_model.bin is read by transformers with
    torch.load(weights_only=True), never plain unpickling.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not ref.present:
        raise ref.missing_error()
    assert ref.path is not None
    folder = ref.path.parent
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise WeightsError(f"{ref.part} {ref.spec!r} in {folder} could not be loaded: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
    return model.eval().requires_grad_(False), tokenizer


def context_length(model: Any) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or config.n_positions)


# ------------------------------------------------------------------------------- chunking
def chunk_spans(n_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) token spans of at most `chunk` tokens, overlapping by one token.

    A chunk's first token is its context only (never scored), so with the overlap every token but
    the text's first is scored exactly once: the pooled sums equal one pass with a longer context.
    """
    if chunk < 2:
        raise ValueError("a chunk needs at least 2 tokens")
    if n_tokens <= chunk:
        return [(0, n_tokens)]
    spans, start = [], 0
    while start + 1 < n_tokens:
        end = min(start + chunk, n_tokens)
        spans.append((start, end))
        start = end - 1
    return spans


# ------------------------------------------------------------------------------- the detector
@dataclass
class FastDetectGPTDetector(Detector):
    scoring: Any
    sampling: Any | None  # None: the scoring model in both roles (white-box setting)
    tokenizer: Any
    calibration_key: str
    model_version: str
    trained: bool
    weights: tuple[WeightsRef, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    min_tokens: int = 32
    max_tokens: int = 16_384
    max_chars: int = 100_000
    chunk_tokens: int = 2048
    max_batch_size: int = 4
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    modality = "text"
    name = "fast-detectgpt"

    @property
    def calibration(self) -> tuple[float, float, float, float]:
        return CALIBRATIONS[self.calibration_key]

    def tokenize(self, text: str) -> list[int]:
        """The scoring tokenizer's ids, with its own special tokens; length limits checked."""
        if len(text) > self.max_chars:
            raise InputTooLong(f"the text has {len(text)} characters, over the limit of {self.max_chars}",
                               limit=self.max_chars, got=len(text), unit="characters")
        ids = self.tokenizer(text, return_token_type_ids=False, verbose=False)["input_ids"]
        if len(ids) > self.max_tokens:
            raise InputTooLong(f"the text has {len(ids)} tokens, over the limit of {self.max_tokens}",
                               limit=self.max_tokens, got=len(ids), unit="tokens")
        if len(ids) < max(self.min_tokens, 2):
            raise InputTooShort(f"the text is too short: {len(ids)} tokens, and Fast-DetectGPT needs at least "
                                f"{self.min_tokens} tokens (of the scoring model's tokenizer) for its criterion "
                                "to mean anything", minimum=self.min_tokens, got=len(ids))
        return list(ids)

    def _forward_chunks(self, chunks: list[list[int]]) -> list[tuple[float, float, float]]:
        """Sums (ll, mu, var) of each chunk; chunks run right-padded in batches, pads masked out."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out: list[tuple[float, float, float]] = []
        for first in range(0, len(chunks), self.max_batch_size):
            group = chunks[first:first + self.max_batch_size]
            width = max(len(c) for c in group)
            ids = torch.full((len(group), width), int(pad or 0), dtype=torch.long)
            attention = torch.zeros((len(group), width), dtype=torch.long)
            for row, chunk in enumerate(group):
                ids[row, :len(chunk)] = torch.tensor(chunk)
                attention[row, :len(chunk)] = 1
            ids, attention = ids.to(self.device), attention.to(self.device)
            scoring_logits = self.scoring(input_ids=ids, attention_mask=attention).logits[:, :-1]
            sampling_logits = scoring_logits if self.sampling is None else \
                self.sampling(input_ids=ids, attention_mask=attention).logits[:, :-1]
            sums = criterion_sums(sampling_logits, scoring_logits, ids[:, 1:], attention[:, 1:].bool())
            out.extend(zip(*(s.cpu().tolist() for s in sums), strict=True))
        return out

    def predict(self, inputs: Sequence[str]) -> list[Score]:
        tokenized = [self.tokenize(text) for text in inputs]
        plan: list[tuple[int, int, int]] = []  # text, start, end
        for number, ids in enumerate(tokenized):
            plan.extend((number, start, end) for start, end in chunk_spans(len(ids), self.chunk_tokens))
        with self._lock, torch.inference_mode():  # one forward at a time: a batch uses every core
            sums = self._forward_chunks([tokenized[n][s:e] for n, s, e in plan])
        results = []
        for number, ids in enumerate(tokenized):
            parts = [(span, total) for span, total in zip(plan, sums, strict=True) if span[0] == number]
            ll, mu, var = (math.fsum(total[k] for _, total in parts) for k in range(3))
            crit = criterion(ll, mu, var)
            chunks = [{"start_token": s, "end_token": e, "scored_tokens": e - s - 1,
                       "criterion": criterion(*total)} for (_, s, e), total in parts]
            results.append(Score(score=crit, fake_probability=machine_probability(crit, self.calibration), detail={
                "criterion": crit, "tokens": len(ids), "scored_tokens": len(ids) - 1, "chunks": chunks,
                "log_likelihood": ll, "expected_log_likelihood": mu, "variance": var}))
        return results

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "calibration": self.calibration_key,
                "criterion": "analytic sampling discrepancy (higher = more machine-like)",
                "min_tokens": self.min_tokens, "max_tokens": self.max_tokens, "max_chars": self.max_chars,
                "chunk_tokens": self.chunk_tokens}


def pick_calibration(config: TextDetectorConfig, random_pair: bool) -> str:
    if config.calibration:
        key = config.calibration
    elif random_pair:
        key = DEFAULT_CALIBRATION  # a random pair has no constants of its own; its verdicts mean nothing
    else:
        key = f"{short_name(config.sampling_model)}_{short_name(config.scoring_model)}"
    if key not in CALIBRATIONS:
        raise DetectorError(f"no criterion-to-probability constants for the model pair {key!r} (the authors "
                            f"publish {', '.join(CALIBRATIONS)}); set TEXT_CALIBRATION to one of them")
    return key


def _check_shared_tokenizer(scoring_tok: Any, sampling_tok: Any) -> None:
    probe = "Fast-DetectGPT checks: the two models must share a tokenizer - 123, äöü, ∑."
    a = scoring_tok(probe, return_token_type_ids=False, verbose=False)["input_ids"]
    b = sampling_tok(probe, return_token_type_ids=False, verbose=False)["input_ids"]
    if a[1:] != b[1:]:  # the authors' assertion on the labels
        raise DetectorError("TEXT_SAMPLING_MODEL and TEXT_SCORING_MODEL tokenize differently: Fast-DetectGPT "
                            "needs a pair that shares one tokenizer")


def _identity(ref: WeightsRef) -> str:
    """random:<seed>, the hub name (with @revision), or local:<folder name>."""
    if ref.kind == "file" and ref.path is not None:
        return f"local:{ref.path.parent.name}"
    return ref.identity()


def model_version(sampling_ref: WeightsRef, scoring_ref: WeightsRef, dtype: torch.dtype) -> str:
    """e.g. fast-detectgpt/EleutherAI/gpt-j-6B@float16_EleutherAI/gpt-neo-2.7B/analytic/fp16"""
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return f"fast-detectgpt/{_identity(sampling_ref)}_{_identity(scoring_ref)}/analytic/{precision}"


def load_detector(config: TextDetectorConfig) -> FastDetectGPTDetector:
    """Resolve both models (random pair, local folders or the Hugging Face cache) and load them."""
    from api.detector.factory import resolve_device
    from api.detector.tiny_lm import BYTE_VOCAB, SAMPLING_VOCAB_PADDING, byte_tokenizer, tiny_gpt2

    device = resolve_device(config.device)
    dtype = _dtype(config.precision, device)
    cache = config.resolved_cache_dir
    scoring_ref = resolve_lm(config.scoring_model, "TEXT_SCORING_MODEL", cache)
    sampling_ref = resolve_lm(config.sampling_model, "TEXT_SAMPLING_MODEL", cache)
    kinds = {scoring_ref.kind == "random", sampling_ref.kind == "random"}
    if kinds == {True, False}:
        raise DetectorError("TEXT_SCORING_MODEL and TEXT_SAMPLING_MODEL must both be random:<seed> or both real "
                            "models (a random model shares no tokenizer with a real one)")
    random_pair = kinds == {True}
    if random_pair:
        # Same seed: one model in both roles (the white-box setting); otherwise two models.
        scoring, tokenizer = tiny_gpt2(scoring_ref.seed or 0).to(dtype), byte_tokenizer()
        sampling = None if sampling_ref.seed == scoring_ref.seed else \
            tiny_gpt2(sampling_ref.seed or 0, vocab_size=BYTE_VOCAB + SAMPLING_VOCAB_PADDING).to(dtype)
    else:
        scoring, tokenizer = load_lm(scoring_ref, dtype)
        if split_revision(config.sampling_model) == split_revision(config.scoring_model):
            sampling = None
        else:
            sampling, sampling_tok = load_lm(sampling_ref, dtype)
            _check_shared_tokenizer(tokenizer, sampling_tok)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id  # as the authors: pad = eos when missing
    key = pick_calibration(config, random_pair)
    context = min(context_length(scoring), context_length(sampling) if sampling is not None else 10**9)
    chunk = min(context, config.chunk_tokens) if config.chunk_tokens else context
    version = model_version(sampling_ref, scoring_ref, dtype)
    return FastDetectGPTDetector(
        scoring=scoring.to(device), sampling=sampling.to(device) if sampling is not None else None,
        tokenizer=tokenizer, calibration_key=key, model_version=version, trained=not random_pair,
        weights=(scoring_ref, sampling_ref), device=device, min_tokens=config.min_tokens,
        max_tokens=config.max_tokens, max_chars=config.max_chars, chunk_tokens=chunk,
        max_batch_size=config.max_batch_size)
