"""Choosing a threshold from reference data: best accuracy, a false-positive rate on real images, or EER.

The rule stays the authors' (fake when p > threshold); only the number moves. Label 1 = fake.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.detector.metrics import accuracies, average_precision, best_threshold

TARGETS = ("accuracy", "fpr", "eer")


@dataclass(frozen=True)
class CurvePoint:
    threshold: float
    tpr: float  # fake images called fake
    fpr: float  # real images called fake
    precision: float
    accuracy: float


def rates(labels: Sequence[int], scores: Sequence[float], threshold: float) -> CurvePoint:
    fake = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    real = [s for s, y in zip(scores, labels, strict=True) if y != 1]
    tp = sum(s > threshold for s in fake)
    fp = sum(s > threshold for s in real)
    tpr = tp / len(fake) if fake else math.nan
    fpr = fp / len(real) if real else math.nan
    precision = tp / (tp + fp) if tp + fp else math.nan
    return CurvePoint(threshold, tpr, fpr, precision, accuracies(labels, scores, threshold)[0])


def _cuts(scores: Sequence[float]) -> list[float]:
    """Every threshold that changes a verdict: below the lowest score and at each distinct score."""
    distinct = sorted(set(scores))
    return [math.nextafter(distinct[0], -math.inf), *distinct] if distinct else [0.5]


def threshold_for_fpr(labels: Sequence[int], scores: Sequence[float], max_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on the real images is at most `max_fpr`."""
    real = sorted((s for s, y in zip(scores, labels, strict=True) if y != 1), reverse=True)
    if not real:
        raise ValueError("a false-positive-rate target needs real images in the reference data")
    allowed = math.floor(max_fpr * len(real) + 1e-9)  # real images that may score above the threshold
    if allowed >= len(real):
        return math.nextafter(real[-1], -math.inf)
    return real[allowed]  # scores strictly above it: at most `allowed` of them (ties stay below)


def threshold_for_eer(labels: Sequence[int], scores: Sequence[float]) -> float:
    """The cut where the false-positive and false-negative rates are closest (equal error rate)."""
    best, gap = 0.5, math.inf
    for cut in _cuts(scores):
        point = rates(labels, scores, cut)
        difference = abs(point.fpr - (1.0 - point.tpr))
        if difference < gap:
            best, gap = cut, difference
    return best


def choose_threshold(labels: Sequence[int], scores: Sequence[float], target: str,
                     max_fpr: float | None = None) -> float:
    if target == "accuracy":
        return best_threshold(labels, scores)[0]
    if target == "fpr":
        if max_fpr is None or not 0 <= max_fpr <= 1:
            raise ValueError("the fpr target needs a rate between 0 and 1 (e.g. --max-fpr 0.01)")
        return threshold_for_fpr(labels, scores, max_fpr)
    if target == "eer":
        return threshold_for_eer(labels, scores)
    raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Probability that a random fake scores above a random real image (ties count half)."""
    fake = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    real = sorted(s for s, y in zip(scores, labels, strict=True) if y != 1)
    if not fake or not real:
        return math.nan
    import bisect

    wins = sum(bisect.bisect_left(real, s) + 0.5 * (bisect.bisect_right(real, s) - bisect.bisect_left(real, s))
               for s in fake)
    return wins / (len(fake) * len(real))


def curve_table(labels: Sequence[int], scores: Sequence[float], points: int = 11) -> list[CurvePoint]:
    """The curve at evenly spaced thresholds 0, 0.1, ..., 1 (what `d3 calibrate` prints)."""
    return [rates(labels, scores, i / (points - 1)) for i in range(points)]


def calibration_report(labels: Sequence[int], scores: Sequence[float], target: str,
                       max_fpr: float | None = None) -> dict[str, Any]:
    threshold = choose_threshold(labels, scores, target, max_fpr)
    chosen = rates(labels, scores, threshold)
    return {"target": target, "max_fpr": max_fpr, "threshold": threshold,
            "at_threshold": chosen.__dict__, "ap": average_precision(labels, scores),
            "roc_auc": roc_auc(labels, scores), "images": len(labels), "fake": sum(1 for y in labels if y == 1),
            "real": sum(1 for y in labels if y != 1)}


def plot_curves(labels: Sequence[int], scores: Sequence[float], threshold: float, path: Path) -> None:
    """ROC and precision-recall curves side by side, the chosen threshold marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    points = [rates(labels, scores, cut) for cut in _cuts(scores)]
    chosen = rates(labels, scores, threshold)
    figure = Figure(figsize=(9, 4), dpi=100)
    roc, pr = figure.subplots(1, 2)
    roc.plot([p.fpr for p in points], [p.tpr for p in points], color="#1f6feb")
    roc.plot([0, 1], [0, 1], linestyle=":", color="#999999")
    roc.scatter([chosen.fpr], [chosen.tpr], color="#d1242f", zorder=3, label=f"threshold {threshold:.4g}")
    roc.set(xlabel="false-positive rate (real called fake)", ylabel="true-positive rate (fake called fake)",
            title=f"ROC (AUC {roc_auc(labels, scores):.3f})", xlim=(0, 1), ylim=(0, 1.02))
    roc.legend(loc="lower right")
    kept = [p for p in points if not math.isnan(p.precision)]
    pr.plot([p.tpr for p in kept], [p.precision for p in kept], color="#1f6feb")
    if not math.isnan(chosen.precision):
        pr.scatter([chosen.tpr], [chosen.precision], color="#d1242f", zorder=3)
    pr.set(xlabel="recall", ylabel="precision", title=f"Precision-recall (AP {average_precision(labels, scores):.3f})",
           xlim=(0, 1), ylim=(0, 1.02))
    figure.tight_layout()
    figure.savefig(path)
