"""Adapting the head to new data: cached two-view features, the authors' training recipe, model cards.

The backbone is frozen (spec §3), so a head is trained on features computed once: `extract_features`
runs the tower over a labelled folder (optionally with the authors' training augmentations) and
`train_head` fits the 12.6 MB head on them in minutes on a CPU. Both are deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from api.detector.metrics import accuracies, average_precision
from api.detector.model import D3Head, D3Model, build_head
from api.detector.preprocess import gaussian_blur, jpeg_reencode, preprocess_image

FEATURES_FORMAT = "d3-features/1"
CARD_FORMAT = "d3-model-card/1"


class TrainingError(Exception):
    """A problem with the data or files a training command was given (shown to the user as is)."""


# -- the authors' training augmentations ----------------------------------------------------------------
@dataclass(frozen=True)
class Augmentation:
    """Blur sigma ~ U(0, 3) with probability 0.5, then JPEG quality ~ U{30..100} with probability 0.5.

    The authors' data pipeline (inherited from UniversalFakeDetect) draws these per sample with
    Gaussian blur first and JPEG second; we draw them per (file, copy, seed) so a cached copy is
    the same whatever order or resume point produced it.
    """

    enabled: bool = True
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.0, 3.0)
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 100)

    def draw(self, seed: int, sha256: str, copy: int) -> tuple[float | None, int | None]:
        if not self.enabled:
            return None, None
        rng = random.Random(f"{seed}:{sha256}:{copy}")
        sigma = rng.uniform(*self.blur_sigma) if rng.random() < self.blur_prob else None
        quality = rng.randint(*self.jpeg_quality) if rng.random() < self.jpeg_prob else None
        return sigma, quality


def augmented_tensor(data: bytes, sigma: float | None, quality: int | None) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    if sigma is not None and sigma > 0:
        rgb = gaussian_blur(rgb, sigma)
    if quality is not None:
        rgb = jpeg_reencode(rgb, quality)
    return preprocess_image(rgb)


# -- feature sets -----------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    """Rows of two-view features (token 0 = shuffled view) with their labels, file hashes and copy index."""

    features: torch.Tensor  # N x 2 x dim, float16
    labels: torch.Tensor  # N, int64 (1 = fake)
    sha256: list[str]
    copies: list[int]
    files: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """A content hash of the set: features, labels and file hashes, independent of row order."""
        order = sorted(range(len(self)), key=lambda i: (self.sha256[i], self.copies[i]))
        h = hashlib.sha256()
        for i in order:
            h.update(self.sha256[i].encode())
            h.update(bytes([int(self.labels[i]), self.copies[i] % 256]))
            h.update(self.features[i].contiguous().numpy().tobytes())
        return h.hexdigest()

    def counts(self) -> dict[str, int]:
        fake = int(self.labels.sum())
        return {"rows": len(self), "files": len(set(self.sha256)), "real": len(self) - fake, "fake": fake}

    def subset(self, keep: Sequence[int]) -> FeatureSet:
        index = torch.tensor(list(keep), dtype=torch.long)
        return FeatureSet(self.features[index], self.labels[index], [self.sha256[i] for i in keep],
                          [self.copies[i] for i in keep], [self.files[i] for i in keep], dict(self.meta))

    def save(self, path: Path) -> None:
        """Atomically: a crash mid-write leaves the previous file, so extraction can resume."""
        payload = {"format": FEATURES_FORMAT, "features": self.features, "labels": self.labels,
                   "sha256": self.sha256, "copies": self.copies, "files": self.files,
                   "meta_json": json.dumps(self.meta, sort_keys=True)}
        tmp = path.with_name(path.name + ".partial")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> FeatureSet:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
            raise TrainingError(f"{path} is not a features file: {str(exc).splitlines()[0][:200]}") from None
        if not isinstance(payload, dict) or payload.get("format") != FEATURES_FORMAT:
            raise TrainingError(f"{path} is not a {FEATURES_FORMAT} file (made by `d3 features`)")
        return cls(payload["features"], payload["labels"], list(payload["sha256"]), list(payload["copies"]),
                   list(payload["files"]), json.loads(payload["meta_json"]))


# What a feature depends on: the tower and its weights, the permutation seed, the precision.
BACKBONE_KEYS = ("backbone", "clip_weights", "shuffle_seed", "precision")


class FeatureSource(Protocol):
    """What computes two-view features: the in-process D3Model, or the tier's (remote_features.py)."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


def backbone_identity(model: D3Model) -> dict[str, Any]:
    """BACKBONE_KEYS of a loaded model (a tier publishes the same, see remote_features.py)."""
    parts = model.model_version.split("/")  # d3/<backbone>/<clip id>/head-<id>/seed<N>/<precision>
    return {"backbone": model.backbone, "clip_weights": parts[2] if len(parts) > 2 else "",
            "shuffle_seed": parts[4].removeprefix("seed") if len(parts) > 4 else "", "precision": model.precision}


def extract_features(model: FeatureSource, items: Sequence[tuple[Path, int]], *, augmentation: Augmentation,
                     copies: int, seed: int, batch_size: int, out: Path | None = None,
                     save_every: int = 20, progress: Callable[[int], None] | None = None,
                     identity: dict[str, Any] | None = None) -> FeatureSet:
    """Two-view features of every (file, label) x copy; with `out`, resumable (rows already there are kept).

    `model` is a D3Model (its identity read with backbone_identity) or any FeatureSource with its
    `identity`; the same identity gives the same meta, so a file may be resumed by either."""
    identity = backbone_identity(model) if identity is None else identity  # type: ignore[arg-type]
    meta = {**identity, "augmentation": asdict(augmentation), "copies": copies, "seed": seed}
    meta = json.loads(json.dumps(meta))  # the form it has after a save and load (tuples become lists)
    done = FeatureSet(torch.empty(0, 2, 0, dtype=torch.float16), torch.empty(0, dtype=torch.long), [], [], [],
                      meta)
    if out is not None and out.exists():
        done = FeatureSet.load(out)
        if done.meta != meta:
            raise TrainingError(f"{out} was made with other settings ({done.meta}); delete it or choose another "
                                f"--out to start again")
    have = set(zip(done.sha256, done.copies, strict=True))
    chunks: list[torch.Tensor] = [done.features] if len(done) else []
    labels, hashes, copy_ids, files = list(done.labels.tolist()), list(done.sha256), list(done.copies), \
        list(done.files)
    if progress and len(done):
        progress(len(done))
    parameters = getattr(model, "parameters", None)  # a module's inputs go to its device; a tier's stay here
    device = next(parameters()).device if callable(parameters) else torch.device("cpu")
    pending: list[tuple[torch.Tensor, int, str, int, str]] = []
    batches = 0

    def flush() -> None:
        nonlocal batches
        if not pending:
            return
        with torch.inference_mode():
            feats = model.features(torch.stack([p[0] for p in pending]).to(device)).to("cpu", torch.float16)
        chunks.append(feats)
        for _, label, digest, copy, name in pending:
            labels.append(label), hashes.append(digest), copy_ids.append(copy), files.append(name)
        if progress:
            progress(len(pending))
        pending.clear()
        batches += 1
        if out is not None and batches % save_every == 0:
            _assemble(chunks, labels, hashes, copy_ids, files, meta).save(out)

    try:
        for path, label in items:
            data = Path(path).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            for copy in range(copies):
                if (digest, copy) in have:
                    continue
                try:
                    tensor = augmented_tensor(data, *augmentation.draw(seed, digest, copy))
                except (OSError, ValueError, SyntaxError) as exc:
                    raise TrainingError(f"cannot read image {path}: {exc}") from None
                pending.append((tensor, label, digest, copy, str(path)))
                have.add((digest, copy))
                if len(pending) >= batch_size:
                    flush()
        flush()
    except Exception:
        if out is not None and batches:  # keep the finished batches (a tier gone, a bad file): a rerun resumes
            _assemble(chunks, labels, hashes, copy_ids, files, meta).save(out)
        raise
    result = _assemble(chunks, labels, hashes, copy_ids, files, meta)
    if out is not None:
        result.save(out)
    return result


def _assemble(chunks: list[torch.Tensor], labels: list[int], hashes: list[str], copies: list[int],
              files: list[str], meta: dict[str, Any]) -> FeatureSet:
    features = torch.cat(chunks) if chunks else torch.empty(0, 2, 0, dtype=torch.float16)
    return FeatureSet(features, torch.tensor(labels, dtype=torch.long), list(hashes), list(copies), list(files),
                      dict(meta))


def split_validation(data: FeatureSet, fraction: float, seed: int) -> tuple[FeatureSet, FeatureSet]:
    """Hold out a seeded share of the FILES (all copies of one file stay on one side)."""
    files = sorted(set(data.sha256))
    rng = random.Random(f"split:{seed}")
    held = set(rng.sample(files, max(1, round(fraction * len(files))))) if len(files) > 1 else set()
    train = [i for i, digest in enumerate(data.sha256) if digest not in held]
    val = [i for i, digest in enumerate(data.sha256) if digest in held]
    return data.subset(train), data.subset(val)


# -- training ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The authors' recipe: AdamW at lr 1e-4, batches of 256, BCE on the logit, early stopping on val accuracy."""

    lr: float = 1e-4
    batch_size: int = 256
    epochs: int = 50
    patience: int = 5  # epochs without a better validation accuracy before stopping
    weight_decay: float = 0.01  # torch.optim.AdamW's default


@dataclass
class EpochReport:
    epoch: int
    loss: float
    val_ap: float
    val_accuracy: float


def head_scores(head: D3Head, features: torch.Tensor, batch_size: int = 4096) -> list[float]:
    head.eval()
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            out += torch.sigmoid(head(features[start:start + batch_size].float())).tolist()
    return out


def evaluate(head: D3Head, data: FeatureSet, threshold: float = 0.5) -> dict[str, float]:
    scores = head_scores(head, data.features)
    labels = data.labels.tolist()
    return {"ap": average_precision(labels, scores), "accuracy": accuracies(labels, scores, threshold)[0]}


def train_head(train: FeatureSet, val: FeatureSet, *, recipe: Recipe, seed: int,
               start: dict[str, torch.Tensor] | None = None,
               report: Callable[[EpochReport], None] | None = None) -> tuple[D3Head, list[EpochReport], int]:
    """Fit a head; returns the best head by validation accuracy, every epoch's report, the best epoch."""
    if len(train) == 0 or len(val) == 0:
        raise TrainingError("training needs at least one training and one validation image")
    if len(set(train.labels.tolist())) < 2:
        raise TrainingError("the training data must contain both real and fake images")
    dim = int(train.features.shape[-1])
    head = build_head(dim, seed=seed)
    if start is not None:
        head.load_state_dict(start, strict=True)
    head.requires_grad_(True)
    features, labels = train.features.float(), train.labels.float()
    with torch.random.fork_rng(devices=[]), _deterministic():
        torch.manual_seed(seed)
        order_rng = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss()
        best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        best_accuracy, best_epoch, since_best = -math.inf, 0, 0
        history: list[EpochReport] = []
        for epoch in range(1, recipe.epochs + 1):
            head.train()
            total, seen = 0.0, 0
            for index in torch.randperm(len(features), generator=order_rng).split(recipe.batch_size):
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(head(features[index]), labels[index])
                loss.backward()
                optimiser.step()
                total += loss.detach().item() * len(index)
                seen += len(index)
            metrics = evaluate(head, val)
            entry = EpochReport(epoch, total / seen, metrics["ap"], metrics["accuracy"])
            history.append(entry)
            if report:
                report(entry)
            if metrics["accuracy"] > best_accuracy:
                best_accuracy, best_epoch, since_best = metrics["accuracy"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            else:
                since_best += 1
                if since_best >= recipe.patience:
                    break
    head.load_state_dict(best_state)
    return head.eval().requires_grad_(False), history, best_epoch


class _deterministic:
    """torch's deterministic algorithms for the duration (restored after), so a seed fixes the bytes."""

    def __enter__(self) -> None:
        self._was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc: object) -> None:
        torch.use_deterministic_algorithms(self._was)


def save_head(head: D3Head, path: Path) -> str:
    """The authors' layout: a plain state_dict (query/key/value/fc weights and biases). Returns its sha256."""
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in head.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- model cards -------------------------------------------------------------------------------------------
def card_path(head_path: Path) -> Path:
    """HEAD.pth -> HEAD.card.json, beside it."""
    return head_path.with_name(head_path.stem + ".card.json")


def write_card(path: Path, card: dict[str, Any]) -> None:
    path.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read model card {path}: {exc}") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise TrainingError(f"{path} is not a {CARD_FORMAT} model card")
    return card


def make_card(*, head_sha256: str, train: FeatureSet, val: FeatureSet, recipe: Recipe, seed: int, start: str,
              history: Iterable[EpochReport], best_epoch: int, before: dict[str, float],
              after: dict[str, float]) -> dict[str, Any]:
    return {
        "format": CARD_FORMAT,
        "head_sha256": head_sha256,
        "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "belongs_to": {k: train.meta.get(k) for k in BACKBONE_KEYS},
        "seed": seed,
        "start": start,
        "recipe": {**asdict(recipe), "optimizer": "AdamW", "loss": "BCEWithLogits (BCE on the logit)",
                   "early_stopping": "validation accuracy"},
        "augmentation": train.meta.get("augmentation"),
        "data": {"train": {**train.counts(), "sha256": train.digest()},
                 "validation": {**val.counts(), "sha256": val.digest()}},
        "epochs_run": len(list(history)),
        "best_epoch": best_epoch,
        "validation": {"start": before, "trained": after},
        "threshold": 0.5,
        "calibration": None,
    }
