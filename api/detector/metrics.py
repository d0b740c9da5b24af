"""Evaluation metrics for `d3 eval` (no scikit-learn dependency). Label 1 = fake = positive."""

from __future__ import annotations

import math
from collections.abc import Sequence


def average_precision(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Step-wise AP = sum_n (R_n - R_{n-1}) * P_n over the distinct score thresholds.

    The same definition as scikit-learn's average_precision_score (tied scores form one step).
    NaN when there are no positives.
    """
    positives = sum(1 for y in labels if y == 1)
    if positives == 0:
        return math.nan
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    ap = prev_recall = 0.0
    tp = fp = 0
    i = 0
    while i < len(order):
        score = scores[order[i]]
        while i < len(order) and scores[order[i]] == score:  # one threshold per distinct score
            tp += labels[order[i]] == 1
            fp += labels[order[i]] != 1
            i += 1
        recall = tp / positives
        ap += (recall - prev_recall) * (tp / (tp + fp))
        prev_recall = recall
    return ap


def accuracies(labels: Sequence[int], scores: Sequence[float], threshold: float) -> tuple[float, float, float]:
    """(overall, real, fake) accuracy when an image is called fake iff score > threshold."""
    correct = [(s > threshold) == (y == 1) for y, s in zip(labels, scores, strict=True)]
    real = [c for c, y in zip(correct, labels, strict=True) if y != 1]
    fake = [c for c, y in zip(correct, labels, strict=True) if y == 1]

    def mean(values: list[bool]) -> float:
        return sum(values) / len(values) if values else math.nan

    return mean(correct), mean(real), mean(fake)


def best_threshold(labels: Sequence[int], scores: Sequence[float], prefer: float = 0.5) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy for the rule score > threshold.

    Candidates cut between consecutive distinct scores (reported as the midpoint), below the
    lowest and at the highest; among equally good cuts the one nearest `prefer` wins. O(n log n).
    """
    if not scores:
        return prefer, math.nan
    pairs = sorted(zip(scores, labels, strict=True))
    total_fake = sum(1 for _, y in pairs if y == 1)
    # Cut below everything: all called fake.
    best = (math.nextafter(pairs[0][0], -math.inf), total_fake / len(pairs))
    real_below = fake_below = 0  # counts at or below the current cut
    i = 0
    while i < len(pairs):
        score = pairs[i][0]
        while i < len(pairs) and pairs[i][0] == score:
            real_below += pairs[i][1] != 1
            fake_below += pairs[i][1] == 1
            i += 1
        cut = (score + pairs[i][0]) / 2 if i < len(pairs) else score
        acc = (real_below + total_fake - fake_below) / len(pairs)
        if acc > best[1] or (acc == best[1] and abs(cut - prefer) < abs(best[0] - prefer)):
            best = (cut, acc)
    return best
