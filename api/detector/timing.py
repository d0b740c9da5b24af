"""Time a request spent waiting on the model, so its log line can say what was the model's.

A context variable, so each request thread (and each contextvars context) counts its own; the
request log resets it when a request begins and reads it when it ends. No torch, no Flask.
"""

from __future__ import annotations

import contextvars

_model_seconds: contextvars.ContextVar[float] = contextvars.ContextVar("d3_model_seconds", default=0.0)


def reset_model_time() -> None:
    _model_seconds.set(0.0)


def add_model_time(seconds: float) -> None:
    _model_seconds.set(_model_seconds.get() + seconds)


def model_time_ms() -> float:
    """Milliseconds spent in InferenceEngine.predict in this context since the last reset."""
    return _model_seconds.get() * 1000.0
