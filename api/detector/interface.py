"""What services and routes may use of an engine: the one interface of its two implementations.

`InferenceEngine` (api/detector/engine.py) runs the model in this process; `RemoteEngine`
(api/detector/remote_engine.py) sends the images to the inference tier. The composition root
(api/context.py) picks one; nothing else knows which it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable


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
