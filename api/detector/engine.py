"""One model per process, shared by all request threads, fed by dynamic micro-batching.

Callers submit preprocessed images; one batching thread gathers them (up to max_batch_size
images, or max_wait_ms after the first arrives), runs one forward under inference_mode and hands
each caller its own results. The queue is bounded: when full, submitting fails at once
(EngineOverloaded), so overload shows as 503 + Retry-After instead of growing latency.

The model is built in the engine's thread after start(), never at import: Gunicorn forks after
import and a CUDA context does not survive a fork, so each worker loads its own model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from api.detector.config import IMAGE_SIZE, DetectorConfig
from api.detector.errors import (
    DetectorError,
    EngineNotReady,
    EngineOverloaded,
    EngineTimeout,
    InferenceError,
)
from api.detector.timing import add_model_time
from api.detector.versions import Head, HeadCatalog, HeadSwitcher, Scores, base_head, score_heads

log = logging.getLogger(__name__)
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)
BatchListener = Callable[[int, float], None]


@dataclass(eq=False)
class _Request:
    """One caller's submission: its images' results fill in as batches finish."""

    size: int
    results: list[float | None] = field(default_factory=list)
    remaining: int = 0
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.results = [None] * self.size
        self.remaining = self.size


@dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    tensor: torch.Tensor
    head: Head  # the head its request pinned when it was submitted


class InferenceEngine:
    def __init__(self, config: DetectorConfig, model: torch.nn.Module | None = None) -> None:
        self.config = config
        self._injected = model
        self.model: torch.nn.Module | None = None
        self.device = torch.device("cpu")
        self.precision = config.precision
        self.model_version = ""
        self.trained = False
        self.loaded = False
        self.warmed = False
        self.ready = False
        self.load_error: str | None = None
        self.load_seconds: float | None = None  # start() to ready, measured by this engine itself
        self._started_at: float | None = None

        self._cond = threading.Condition()
        self._queue: deque[_Item] = deque()
        self._settled = threading.Event()  # set once loading has succeeded or failed
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listeners: list[BatchListener] = []
        self._stats = {"images_processed": 0, "batches_run": 0, "forward_seconds_total": 0.0, "last_batch_size": 0}
        self.heads: HeadSwitcher | None = None  # built once the model is loaded
        self._catalog: tuple[HeadCatalog, float] | None = None

    def attach_versions(self, catalog: HeadCatalog, poll_s: float = 2.0) -> None:
        """Serve the active model version of `catalog` (polled every poll_s) instead of only the
        configured head. Before start(): the first read happens before the engine says ready."""
        self._catalog = (catalog, poll_s)
        heads = self.heads
        if heads is not None:  # already loaded: watch this catalog from now on
            heads.catalog, heads.poll_s = catalog, poll_s
            heads.sync()
            heads.start()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load (or adopt) the model, warm it up and serve, all in a daemon thread."""
        if self._thread is not None:
            return
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="d3-inference", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the model is ready or failed to load; True when ready."""
        self._settled.wait(timeout)
        return self.ready

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; queued callers get EngineNotReady."""
        with self._cond:
            self._stopping = True
            self.ready = False
            pending, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for item in pending:
            self._fail(item.request, EngineNotReady("the inference engine stopped"))
        if self.heads is not None:
            self.heads.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:  # the process keeps serving /health etc.; describe() shows why
            self.load_error = str(exc) if isinstance(exc, DetectorError) else f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.load_error)
            self._settled.set()
            return
        heads = self.heads
        assert heads is not None
        if heads.catalog is not None:
            heads.sync()  # serve the active version from the first request on (if it can be read now)
            heads.start()
        self.load_seconds = time.monotonic() - (self._started_at or time.monotonic())
        with self._cond:
            self.ready = not self._stopping
        self._settled.set()
        log.info("model ready: %s on %s", self.model_version, self.device)
        if not self.trained:
            log.warning("THIS MODEL HAS RANDOM (UNTRAINED) WEIGHTS: its verdicts mean nothing. "
                        "Set D3_CLIP_WEIGHTS and D3_HEAD_WEIGHTS to real checkpoints for real use.")
        self._serve()

    def _load(self) -> None:
        if self._injected is not None:
            model = self._injected.eval()
            first = next(iter(list(model.parameters()) + list(model.buffers())), None)
            self.device = first.device if first is not None else torch.device("cpu")
        else:
            from api.detector.factory import build_model

            model = build_model(self.config)
            self.device = next(model.parameters()).device
        self.model = model
        self.precision = getattr(model, "precision", self.config.precision)
        self.model_version = getattr(model, "model_version", "") or f"custom/{type(model).__name__}"
        self.trained = bool(getattr(model, "trained", False))
        head = getattr(model, "head", None)
        catalog, poll_s = self._catalog or (None, 2.0)
        self.heads = HeadSwitcher(base_head(model), int(getattr(head, "dim", 0)), self.device, catalog, poll_s)
        self.heads.on_switch(self._switched)
        self.loaded = True
        with torch.inference_mode():  # warm-up: first forward allocates kernels/workspaces
            model(torch.zeros((1, *INPUT_SHAPE), device=self.device))
        self.warmed = True

    # ------------------------------------------------------------ public API
    def _switched(self, head: Head) -> None:
        # What answers now, for /health and describe(); each request still carries its own pinned head.
        self.model_version, self.trained = head.model_version, head.trained

    def head(self, version: str | None = None) -> Head:
        """The head a request pins: the active one now, or a named version (loaded if needed;
        CONFIGURED: the configured head)."""
        heads = self.heads
        if heads is None:  # not loaded: predict will say so
            return Head(None, self.model_version, self.trained)
        return heads.active if version is None else heads.get(version)

    def sync_versions(self) -> bool:
        """Read the active version now instead of at the next poll; True when the head changed."""
        return self.heads.sync() if self.heads is not None else False

    def versions(self) -> dict[str, Any] | None:
        return self.heads.describe() if self.heads is not None else None

    def describe(self) -> dict[str, Any]:
        return {
            "loaded": self.loaded,
            "warmed": self.warmed,
            "ready": self.ready,
            "device": str(self.device),
            "precision": self.precision,
            "backbone": getattr(self.model, "backbone", self.config.backbone),
            "model_version": self.model_version,
            "trained": self.trained,
            "error": self.load_error,
            "max_batch_size": self.config.max_batch_size,
        }

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"queue_depth": len(self._queue), **self._stats}

    def add_batch_listener(self, fn: BatchListener) -> None:
        """fn(batch_size, forward_seconds) after every forward; for metrics."""
        self._listeners.append(fn)

    def predict(self, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> list[float]:
        """Fake probabilities for preprocessed 3x224x224 images, in order, from the active head.

        Raises EngineNotReady, EngineOverloaded (queue full, at once), EngineTimeout, InferenceError.
        """
        return self.score(tensors, timeout).probabilities

    def score(self, tensors: Sequence[torch.Tensor], timeout: float | None = None,
              head: Head | None = None) -> Scores:
        """predict(), with every image scored by one head: `head` (pinned earlier by the caller, so a
        video's chunks share it) or the one active now; the result names it."""
        head = self.head() if head is None else head
        if not tensors:
            return Scores([], head)
        for tensor in tensors:
            if tuple(tensor.shape) != INPUT_SHAPE:
                raise ValueError(f"expected preprocessed images of shape {INPUT_SHAPE}, got {tuple(tensor.shape)}")
        if len(tensors) > self.config.queue_size:
            raise ValueError(f"{len(tensors)} images exceed the queue size ({self.config.queue_size})")
        started = time.perf_counter()
        try:
            return Scores(self._submit_and_wait(tensors, timeout, head), head)
        finally:
            add_model_time(time.perf_counter() - started)

    def _submit_and_wait(self, tensors: Sequence[torch.Tensor], timeout: float | None, head: Head) -> list[float]:
        request = _Request(len(tensors))
        items = [_Item(request, i, t, head) for i, t in enumerate(tensors)]
        with self._cond:
            if not self.ready:
                raise EngineNotReady(self._not_ready_reason())
            if len(self._queue) + len(items) > self.config.queue_size:
                raise EngineOverloaded(f"inference queue is full ({len(self._queue)} images waiting)",
                                       retry_after=self._retry_after())
            self._queue.extend(items)
            self._cond.notify_all()
        timeout = self.config.infer_timeout_s if timeout is None else timeout
        if not request.done.wait(timeout):
            with self._cond:  # drop what has not started; it will not be computed later
                self._queue = deque(item for item in self._queue if item.request is not request)
            if not request.done.is_set():
                raise EngineTimeout(f"prediction did not finish within {timeout:g} s")
        if request.error is not None:
            raise request.error
        return [float(p) for p in request.results]  # type: ignore[arg-type]

    def _not_ready_reason(self) -> str:
        if self._stopping:
            return "the inference engine stopped"
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        return "the model is still loading"

    def _retry_after(self) -> float:
        # Roughly the time to drain the queue at the recent forward speed; at least a second.
        batches, seconds = self._stats["batches_run"], self._stats["forward_seconds_total"]
        per_batch = seconds / batches if batches else 1.0
        return max(1.0, round(per_batch * len(self._queue) / self.config.max_batch_size, 1))

    # ------------------------------------------------------------ batching thread
    def _serve(self) -> None:
        max_wait = self.config.max_wait_ms / 1000.0
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                deadline = time.monotonic() + max_wait
                while len(self._queue) < self.config.max_batch_size and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.config.max_batch_size))]
            if batch:
                self._run_batch(batch)

    def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            probabilities = self._forward_splitting(batch)
        except Exception as exc:  # one bad batch must not kill the thread
            log.exception("inference failed for a batch of %d", len(batch))
            for item in batch:
                self._fail(item.request, InferenceError(f"inference failed: {type(exc).__name__}: {exc}"))
            return
        seconds = time.perf_counter() - start
        for item, p in zip(batch, probabilities, strict=True):
            if p is None:
                continue
            request = item.request
            with self._cond:
                request.results[item.index] = p
                request.remaining -= 1
                finished = request.remaining == 0
            if finished:
                request.done.set()
        computed = sum(p is not None for p in probabilities)
        with self._cond:
            self._stats["images_processed"] += computed
            self._stats["batches_run"] += 1
            self._stats["forward_seconds_total"] += seconds
            self._stats["last_batch_size"] = len(batch)
        for listener in list(self._listeners):
            try:
                listener(len(batch), seconds)
            except Exception:
                log.exception("batch listener failed")

    def _forward_splitting(self, batch: list[_Item]) -> list[float | None]:
        """Forward a batch; on CUDA out-of-memory retry in halves. An image that still does not
        fit fails only its own caller (None in the result)."""
        try:
            return self._forward(batch)
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                log.warning("out of GPU memory for a single image")
                self._fail(batch[0].request, InferenceError("out of GPU memory for this image"))
                return [None]
            log.warning("out of GPU memory for a batch of %d; splitting it", len(batch))
            half = len(batch) // 2
            return self._forward_splitting(batch[:half]) + self._forward_splitting(batch[half:])

    def _forward(self, batch: list[_Item]) -> list[float]:
        assert self.model is not None
        x = torch.stack([item.tensor for item in batch]).to(self.device, non_blocking=True)
        with torch.inference_mode():
            return score_heads(self.model, x, [item.head for item in batch])

    def _fail(self, request: _Request, error: Exception) -> None:
        with self._cond:
            if request.error is None:
                request.error = error
        request.done.set()
