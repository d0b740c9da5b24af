"""The remote engine: the same surface as InferenceEngine, backed by a Triton inference tier.

With D3_INFERENCE_URL set, every API worker sends its preprocessed images to one shared tier
(`d3 serve-inference`, or a stock Triton serving an exported model) over the standard KServe v2
protocol, through tritonclient, instead of loading a model of its own. Triton does the queueing
and the batching across all workers; this side only bounds each call and translates failures
into the engine's own exceptions, so services and routes cannot tell the two engines apart:

- Triton's queue full, or its queue policy timing out  -> EngineOverloaded (as the in-process queue)
- no answer within D3_INFERENCE_TIMEOUT_S (hung tier)   -> EngineTimeout
- any other error from the tier                         -> InferenceError
- the tier unreachable (refused, reset, no route)       -> InferenceTierUnavailable, an outside
  system's `Unavailable` (api/exceptions.py), so it says what is down
All of them end as 503 + Retry-After.

A monitor thread polls the tier's model readiness and config, so `ready` is a plain attribute (read on every
request) and the model's identity is re-read whenever the tier comes back (it may come back with
another model). A call made while the tier is marked down tries it at once, so the API recovers
as soon as the tier does, without a restart.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from api.detector.errors import EngineNotReady, EngineOverloaded, EngineTimeout, InferenceError
from api.detector.timing import add_model_time
from api.detector.versions import CONFIGURED, Head, Scores
from api.detector.weights import backbone_is_random, with_head
from api.exceptions import InferenceTierUnavailable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from api.config import Settings

log = logging.getLogger(__name__)
INPUT_SHAPE = (3, 224, 224)
BatchListener = Callable[[int, float], None]
# grpc's default reconnect backoff grows to 2 minutes; a tier that is back should be used at once.
_GRPC_CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                      ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 10_000),
                      ("grpc.keepalive_timeout_ms", 5_000)]
# Triton's answers when its dynamic batcher refuses work (queue full, or the queue policy's timeout).
_OVERLOAD_MESSAGES = ("exceeds maximum queue size", "request timeout expired")


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    model_name: str = "d3"
    timeout_s: float = 5.0
    poll_interval_s: float = 2.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteConfig:
        return cls(url=settings.d3_inference_url, model_name=settings.d3_inference_model,
                   timeout_s=settings.d3_inference_timeout_s)

    @property
    def protocol(self) -> str:
        return "grpc" if self.url.startswith("grpc://") else "http"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return urlsplit(self.url).netloc


@dataclass(frozen=True)
class TierModel:
    """What the tier says about its model (its Triton config; identity from its `parameters`)."""

    input_name: str
    input_dtype: str
    output_name: str
    max_batch_size: int
    model_version: str
    trained: bool
    backbone: str
    precision: str
    device: str
    version_input: str | None = None  # the tier takes a pinned model version per request
    pixel_input: str | None = None  # ... and the uint8 pixels instead of the float32 images
    version_output: str | None = None  # ... and names the model_version that scored each image

    @classmethod
    def from_config(cls, config: dict[str, Any], model_name: str) -> TierModel:
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        inputs, outputs = config.get("input") or [{}], config.get("output") or [{}]
        input_names = {i.get("name") for i in inputs}
        output_names = {o.get("name") for o in outputs}
        # The float images, unless the model takes only pixels (`d3 export-onnx --input pixels`).
        images = next((i for i in inputs if i.get("name") == "images"), inputs[0])
        dtype = str(images.get("data_type", "TYPE_FP32")).removeprefix("TYPE_")
        pixels_only = images.get("name") == "pixels" and dtype == "UINT8"
        version = params.get("d3_model_version", "")
        if not version:  # a stock Triton whose config.pbtxt does not say: never call it trained
            log.warning("the tier's model %r publishes no d3_model_version parameter; treating it as untrained",
                        model_name)
        return cls(input_name=images.get("name", "images"),
                   input_dtype=dtype if dtype in ("FP32", "FP16") or pixels_only else "FP32",
                   output_name=outputs[0].get("name", "fake_probability"),
                   max_batch_size=int(config.get("max_batch_size") or 1),
                   model_version=version or f"triton/{model_name}/unknown", trained=params.get("d3_trained") == "true",
                   backbone=params.get("d3_backbone", ""), precision=params.get("d3_precision", ""),
                   device=params.get("d3_device", ""),
                   version_input="head_version" if "head_version" in input_names else None,
                   pixel_input="pixels" if "pixels" in input_names else None,
                   version_output="model_version" if "model_version" in output_names else None)


def wire_images(model: TierModel, images: np.ndarray) -> tuple[str, np.ndarray, str]:
    """(input name, array, datatype) that sends these float32 images to the tier's model.

    A quarter of the bytes to encode, send and decode, and the same floats on the tier: the pixels
    the images were normalised from, when the model takes them and they exist. Raises
    InferenceError for a model that takes only pixels when the images came from none.
    """
    import numpy as np

    from api.detector.preprocess import pixels_of

    if model.pixel_input and (pixels := pixels_of(images)) is not None:
        return model.pixel_input, pixels, "UINT8"
    if model.input_dtype == "UINT8":
        raise InferenceError(f"the tier's model takes only uint8 {model.input_name!r}, and these images "
                             "were not normalised from 8-bit pixels")
    return model.input_name, images.astype(np.float16) if model.input_dtype == "FP16" else images, model.input_dtype


class _TierUnreachable(Exception):
    pass


class RemoteEngine:
    """Forwards predictions to a Triton tier; see the module docstring for the failure mapping."""

    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self.device = "remote"  # not a torch device: this process holds no model (no GPU memory to report)
        self.precision = ""
        self.model_version = ""
        self.trained = False
        self.loaded = False
        self.warmed = False
        self.ready = False
        self.load_error: str | None = "not connected to the inference tier yet"
        self.tier_model: TierModel | None = None
        self.catalog: Any = None
        self._active: tuple[str | None, float | None] = (None, None)  # the active version id and its threshold
        self._poll_s = 2.0
        self._versions_thread: threading.Thread | None = None

        self._lock = threading.Lock()
        self._settled = threading.Event()  # set once the tier has been reached
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a call timed out: look at the tier now, not at the next poll
        self._thread: threading.Thread | None = None
        self._local = threading.local()  # the HTTP client is not thread-safe: one per thread
        self._grpc_client: Any = None
        self._in_flight = 0
        self._listeners: list[BatchListener] = []
        self._stats = {"images_processed": 0, "requests_sent": 0, "request_seconds_total": 0.0}

    def attach_versions(self, catalog: Any, poll_s: float = 2.0) -> None:
        """Pin requests to the catalog's active version. This side holds no heads: it polls which
        version is active (cheap, a row) and asks the tier for that head by id; the tier loads it from
        the store and reports the model_version that scored each image, which is what is stored."""
        self.catalog, self._poll_s = catalog, poll_s
        self._poll_versions()
        if self._versions_thread is None:
            self._versions_thread = threading.Thread(target=self._versions_loop, name="d3-model-versions",
                                                     daemon=True)
            self._versions_thread.start()

    def sync_versions(self) -> None:
        """Read the active version now instead of at the next poll."""
        if self.catalog is not None:
            self._poll_versions()

    def _poll_versions(self) -> None:
        try:
            version = self.catalog.active_version()
            threshold = self.catalog.version_threshold(version) if version else None
        except Exception as exc:  # noqa: BLE001 - database down: keep the last known version
            log.warning("model version poll failed (keeping %s): %s", self._active[0] or "the configured head", exc)
            return
        self._active = (version, threshold)

    def _versions_loop(self) -> None:
        while not self._stopping.wait(self._poll_s):
            self._poll_versions()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Connect in the background and keep watching the tier."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._monitor, name="d3-inference-tier", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._settled.wait(timeout)
        return self.ready

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        self.ready = False
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._grpc_client is not None:
            self._grpc_client.close()

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            try:  # the config too, every time: a tier restarted between two polls may serve another model
                self.connect(self.config.timeout_s)
            except Exception as exc:  # any failure to reach the tier: down until the next poll says otherwise
                self._mark_down(_describe(exc))
            self._wake.wait(self.config.poll_interval_s if self.ready else min(1.0, self.config.poll_interval_s))
            self._wake.clear()

    def connect(self, timeout: float) -> None:
        """Read the model's config (identity, tensors, max batch) and mark the tier ready."""
        client = self._client()
        kw = self._timeout_kw(timeout)
        if not client.is_model_ready(self.config.model_name, **kw):
            raise _TierUnreachable(f"the tier at {self.config.url} has no ready model {self.config.model_name!r}")
        if self.config.protocol == "grpc":
            config = client.get_model_config(self.config.model_name, as_json=True, **kw)["config"]
        else:
            config = client.get_model_config(self.config.model_name)
        model = self._read_model(config)
        with self._lock:
            changed = self.tier_model is None or model.model_version != self.model_version
            self.tier_model = model
            self.model_version, self.trained = model.model_version, model.trained
            self.precision = model.precision
            self.loaded = self.warmed = True
            self.load_error = None
            self.ready = not self._stopping.is_set()
        self._settled.set()
        if changed:
            log.info("inference tier %s ready: %s (%s) on %s", self.config.url, model.model_version,
                     "trained" if model.trained else "RANDOM, UNTRAINED weights", model.device or "?")

    def _read_model(self, config: dict[str, Any]) -> Any:
        """What the tier's config says of the model; a remote detector (remote_detectors.py) reads its own."""
        return TierModel.from_config(config, self.config.model_name)

    def probe(self, timeout: float) -> dict[str, Any]:
        """/health's prober check: reach the tier now, within `timeout`; raises when it cannot serve."""
        try:
            self.connect(min(timeout, self.config.timeout_s))
        except Exception as exc:
            self._mark_down(_describe(exc))
            raise _TierUnreachable(self.load_error) from None
        return {"url": self.config.url, "model": self.config.model_name, "model_version": self.model_version}

    def _mark_down(self, reason: str) -> None:
        with self._lock:
            was_ready = self.ready
            self.ready = False
            self.load_error = f"inference tier {self.config.url} unavailable: {reason}"
        if was_ready:
            log.warning("%s", self.load_error)

    # ------------------------------------------------------------ clients
    def _client(self) -> Any:
        if self.config.protocol == "grpc":
            if self._grpc_client is None:
                import tritonclient.grpc as grpcclient

                with self._lock:
                    if self._grpc_client is None:
                        self._grpc_client = grpcclient.InferenceServerClient(
                            self.config.address, channel_args=_GRPC_CHANNEL_ARGS)
            return self._grpc_client
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.http as httpclient

            timeout = self.config.timeout_s
            client = httpclient.InferenceServerClient(
                self.config.address, ssl=self.config.url.startswith("https://"),
                connection_timeout=timeout, network_timeout=timeout)
            self._local.client = client
        return client

    def _timeout_kw(self, timeout: float) -> dict[str, float]:
        # The gRPC client takes a deadline per call; the HTTP client's are set when it is built.
        return {"client_timeout": timeout} if self.config.protocol == "grpc" else {}

    # ------------------------------------------------------------ public API
    def describe(self) -> dict[str, Any]:
        model = self.tier_model
        return {
            "loaded": self.loaded,
            "warmed": self.warmed,
            "ready": self.ready,
            "device": model.device if model else "",
            "precision": self.precision,
            "backbone": model.backbone if model else "",
            "model_version": self.model_version,
            "trained": self.trained,
            "error": self.load_error,
            "max_batch_size": model.max_batch_size if model else None,
            "inference_tier": {"url": self.config.url, "model": self.config.model_name, "ready": self.ready},
        }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"queue_depth": self._in_flight, **self._stats}

    def add_batch_listener(self, fn: BatchListener) -> None:
        """Accepted for the common surface; never called: the batches are the tier's, and its own
        metrics (nv_inference_count / nv_inference_exec_count) count them."""
        self._listeners.append(fn)

    def head(self, version: str | None = None) -> Head:
        """The head a request pins: the active version (as last polled), or a named one; the tier is
        asked for exactly that head."""
        threshold = None
        if version is None:
            version, threshold = self._active
        if version is None or version == CONFIGURED:
            return Head(None, self.model_version, self.trained)
        return Head(version, with_head(self.model_version, version), not backbone_is_random(self.model_version),
                    threshold)

    def score(self, tensors: Sequence[torch.Tensor], timeout: float | None = None,
              head: Head | None = None) -> Scores:
        head = self.head() if head is None else head
        probabilities, versions = self._call(tensors, timeout, head)
        if versions and set(versions) != {head.model_version}:
            # The tier reports what scored the images: that is what is stored, never a guess.
            if len(set(versions)) > 1:
                raise InferenceError(f"the tier scored one request with several heads: {sorted(set(versions))}")
            head = Head(head.version, versions[0], head.trained, head.threshold)
        return Scores(probabilities, head)

    def predict(self, tensors: Sequence[torch.Tensor], timeout: float | None = None) -> list[float]:
        """Fake probabilities for preprocessed 3x224x224 images, in order; one request to the tier
        (split only where the tier's max_batch_size is smaller than the call)."""
        return self._call(tensors, timeout, None)[0]

    def _call(self, tensors: Sequence[torch.Tensor], timeout: float | None,
              head: Head | None) -> tuple[list[float], list[str]]:
        if not tensors:
            return [], []
        for tensor in tensors:
            if tuple(tensor.shape) != INPUT_SHAPE:
                raise ValueError(f"expected preprocessed images of shape {INPUT_SHAPE}, got {tuple(tensor.shape)}")
        return self._bounded(len(tensors), timeout,
                             lambda deadline, bound: self._predict(tensors, deadline, bound, head))

    def _bounded(self, count: int, timeout: float | None, call: Callable[[float, float], Any]) -> Any:
        """call(deadline, bound) under this call's bound, its `count` inputs in flight, timed as model time."""
        bound = self.config.timeout_s if timeout is None else min(timeout, self.config.timeout_s)
        started = time.perf_counter()
        deadline = time.monotonic() + bound
        with self._lock:
            self._in_flight += count
        try:
            return call(deadline, bound)
        finally:
            seconds = time.perf_counter() - started
            add_model_time(seconds)
            with self._lock:
                self._in_flight -= count

    def _connected_model(self, deadline: float, bound: float) -> Any:
        """The tier's model, connecting first when the tier is marked down."""
        if self._stopping.is_set():
            raise EngineNotReady("the inference engine stopped")
        if not self.ready or self.tier_model is None:
            try:  # marked down: try the tier now rather than wait for the next poll
                self.connect(max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                self._mark_down(_describe(exc))
                if _is_timeout(exc):
                    raise EngineTimeout(f"the inference tier did not answer within {bound:g} s") from None
                raise InferenceTierUnavailable() from None  # the address and cause: the log and /health
        assert self.tier_model is not None
        return self.tier_model

    def _predict(self, tensors: Sequence[torch.Tensor], deadline: float, bound: float,
                 head: Head | None = None) -> tuple[list[float], list[str]]:
        import torch

        model = self._connected_model(deadline, bound)
        name, batch, datatype = wire_images(model, torch.stack(list(tensors)).numpy())
        # The head by id ("" = the tier's active one, "configured" = its D3_HEAD_WEIGHTS), when the tier takes one.
        pin = "" if head is None else (head.version or CONFIGURED)
        results: list[float] = []
        versions: list[str] = []
        for start in range(0, len(batch), model.max_batch_size):
            images = (name, batch[start:start + model.max_batch_size], datatype)
            scores, names = self._infer(model, images, deadline, bound, pin)
            results.extend(scores)
            versions.extend(names)
        with self._lock:
            self._stats["images_processed"] += len(results)
        return results, versions

    def _infer(self, model: TierModel, images: tuple[str, Any, str], deadline: float, bound: float,
               pin: str = "") -> tuple[list[float], list[str]]:
        """One call of (input name, batch, datatype) images; their scores and the versions that scored them."""
        import numpy as np

        inputs = [images]
        count = len(images[1])
        outputs = [model.output_name]
        if model.version_input:
            inputs.append((model.version_input, np.array([[pin.encode()]] * count, dtype=np.object_), "BYTES"))
        if model.version_output:
            outputs.append(model.version_output)
        response = self._send(inputs, outputs, deadline, bound)
        scores = [float(p) for p in response.as_numpy(model.output_name).reshape(-1)]
        names = []
        if model.version_output:
            names = [v.decode() if isinstance(v, bytes) else str(v)
                     for v in response.as_numpy(model.version_output).reshape(-1)]
        return scores, names

    def _send(self, inputs: Sequence[tuple[str, Any, str]], outputs: Sequence[str], deadline: float,
              bound: float) -> Any:
        """One KServe v2 infer call of (name, array, datatype) inputs within the deadline; the response."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise EngineTimeout(f"the inference tier did not answer within {bound:g} s")
        client = self._client()
        if self.config.protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        requests = []
        for name, array, datatype in inputs:
            request = tc.InferInput(name, list(array.shape), datatype)
            request.set_data_from_numpy(array)
            requests.append(request)
        # `timeout` (microseconds) is Triton's per-request queue deadline: what waits longer than
        # this call will wait is dropped from the queue, not computed for nobody.
        kw: dict[str, Any] = {"timeout": max(1, int(left * 1e6))}
        if self.config.protocol == "grpc":
            kw["client_timeout"] = left
        started = time.perf_counter()
        try:
            response = client.infer(self.config.model_name, requests,
                                    outputs=[tc.InferRequestedOutput(name) for name in outputs], **kw)
        except Exception as exc:
            raise self._translate(exc, bound) from None
        with self._lock:
            self._stats["requests_sent"] += 1
            self._stats["request_seconds_total"] += time.perf_counter() - started
        return response

    def _translate(self, exc: Exception, bound: float) -> Exception:
        text = _describe(exc)
        if any(m in text.lower() for m in _OVERLOAD_MESSAGES):
            return EngineOverloaded(f"the inference tier is overloaded: {text}", retry_after=1.0)
        if _is_timeout(exc):
            # Hung, or only slow under load? The monitor asks the tier's (cheap) readiness now and
            # marks it down only if that goes unanswered too.
            self._wake.set()
            return EngineTimeout(f"the inference tier did not answer within {bound:g} s")
        if _is_unreachable(exc):
            self._mark_down(text)
            return InferenceTierUnavailable()
        log.error("inference tier error: %s", text)
        return InferenceError(f"inference failed on the tier: {text}")


# ---------------------------------------------------------------- error classification
def _describe(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return text or type(exc).__name__


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return True
    return "DEADLINE_EXCEEDED" in _status(exc) or "deadline exceeded" in _describe(exc).lower()


def _is_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, _TierUnreachable)):  # refused, reset, no route (HTTP client)
        return True
    status = _status(exc)
    return "UNAVAILABLE" in status or "failed to connect" in _describe(exc).lower() or status in ("502", "503")

