"""Exceptions raised by the detector package; the API maps them to HTTP answers."""

from __future__ import annotations


class DetectorError(Exception):
    """Base class: something the detector cannot do, with a message meant for an operator."""


class WeightsError(DetectorError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model."""


class EngineNotReady(DetectorError):
    """The model is not loaded (yet, or it failed to load, or the engine stopped)."""


class EngineOverloaded(DetectorError):
    """The queue is full; retry after `retry_after` seconds (the API answers 503 + Retry-After)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineTimeout(DetectorError):
    """A prediction did not finish within its timeout."""


class InferenceError(DetectorError):
    """The forward pass failed for these images (e.g. out of GPU memory for a single image)."""
