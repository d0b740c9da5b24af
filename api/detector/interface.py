"""The one interface every detector of the service shares (D³ for images and video, AASIST for speech,
Fast-DetectGPT for text), and what a detector that cannot serve says about itself.

A detector is built from its settings by its own module (api/detector/aasist.py,
api/detector/fast_detectgpt.py); api/detector/registry.py holds one per modality.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from api.detector.errors import DetectorError
from api.detector.weights import WeightsRef
from api.exceptions import Unavailable

MODALITIES = ("image", "video", "audio", "text")


@dataclass(frozen=True)
class Score:
    """One input's result: the detector's own score (its meaning is the detector's) and the service's
    fake probability (the detector module documents the mapping)."""

    score: float
    fake_probability: float
    detail: dict[str, Any] | None = None


class Detector(ABC):
    """A loaded detector: what it is (modality, name, version, trained) and a batched predict."""

    modality: ClassVar[str]
    name: ClassVar[str]
    model_version: str
    trained: bool
    weights: tuple[WeightsRef, ...]

    @abstractmethod
    def predict(self, inputs: Sequence[Any]) -> list[Score]:
        """One Score per input, in order. Inputs are already decoded (a 16 kHz window, a text)."""

    def describe(self) -> dict[str, Any]:
        return {"modality": self.modality, "name": self.name, "model_version": self.model_version,
                "trained": self.trained}


class DetectorUnavailable(Unavailable):
    """A modality cannot serve: its weights are missing or failed to load, or it is still loading.

    An `Unavailable` (the API's 503 + Retry-After); `missing` names the absent weights file (or
    model) when that is the reason, and goes into the error body.
    """

    def __init__(self, modality: str, message: str, missing: str | None = None, loading: bool = False) -> None:
        extra = {"missing": missing} if missing else {}
        super().__init__(message, retry_after=10 if loading else 60, modality=modality, **extra)
        self.modality = modality
        self.missing = missing
        self.loading = loading


class InputTooShort(DetectorError):
    """The input carries too little signal for the method to mean anything (e.g. a text under the
    minimum number of tokens); the message says how much is needed."""

    def __init__(self, message: str, minimum: int, got: int) -> None:
        super().__init__(message)
        self.message = message
        self.minimum = minimum
        self.got = got


class InputTooLong(DetectorError):
    """The input is over a length limit (characters or tokens); the message names the limit."""

    def __init__(self, message: str, limit: int, got: int, unit: str) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.got = got
        self.unit = unit


def missing_weights(refs: Sequence[WeightsRef]) -> WeightsRef | None:
    """The first weights that are neither random nor present on disk."""
    return next((ref for ref in refs if not ref.present), None)
