"""The interfaces services and routes may use of a detector, whichever implementation serves it.

- `Engine`: the D³ image/video engine. `InferenceEngine` (api/detector/engine.py) runs the model in
  this process; `RemoteEngine` (api/detector/remote_engine.py) sends the images to the inference
  tier. The composition root (api/context.py) picks one; nothing else knows which it holds.
- `Detector`: every other modality's detector (AASIST for speech, Fast-DetectGPT for text): its
  modality, name, model version, `trained` flag, weights and a batched predict.
  api/detector/registry.py holds one per modality, built from the settings: in this process
  (aasist.py, fast_detectgpt.py) or in the inference tier (remote_detectors.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from api.detector.errors import DetectorError
from api.detector.versions import Head, Scores
from api.detector.weights import WeightsRef
from api.exceptions import Unavailable

MODALITIES = ("image", "video", "audio", "text")


@runtime_checkable
class Engine(Protocol):
    ready: bool  # read on every request: a plain attribute, never a network call
    trained: bool
    model_version: str
    load_error: str | None

    def start(self) -> None: ...

    def wait_ready(self, timeout: float | None = None) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...

    def add_batch_listener(self, fn: Callable[[int, float], None]) -> None: ...

    def predict(self, tensors: Sequence[Any], timeout: float | None = None) -> list[float]:
        """Fake probabilities in order; raises EngineNotReady, EngineOverloaded, EngineTimeout,
        InferenceError, or (remote) InferenceTierUnavailable: each one ends as a 503."""
        ...

    def head(self, version: str | None = None) -> Head:
        """The head a request pins (api/detector/versions.py): the active model version now, or a named one."""
        ...

    def score(self, tensors: Sequence[Any], timeout: float | None = None, head: Head | None = None) -> Scores:
        """predict() with every image scored by one head (the pinned one, else the active one), named
        in the result: what the services store as the prediction's model_version."""
        ...


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
    ready: bool = True  # a remote detector (remote_detectors.py): only while the tier serves its model

    @abstractmethod
    def predict(self, inputs: Sequence[Any]) -> list[Score]:
        """One Score per input, in order. Inputs are already decoded (a 16 kHz window, a text)."""

    def describe(self) -> dict[str, Any]:
        return {"modality": self.modality, "name": self.name, "model_version": self.model_version,
                "trained": self.trained}

    def stop(self, timeout: float = 5.0) -> None:
        """Release what the detector runs in the background; an in-process one runs nothing."""
        return None


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
