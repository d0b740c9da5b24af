"""The inference tier: the D³ model served by Triton Inference Server through PyTriton.

One process per GPU: it builds the project's own PyTorch model (exactly what the in-process
engine runs), warms it up, then starts Triton with the model bound as `d3`. Triton owns the
request queue, the dynamic batching, the health endpoints (`/v2/health/ready`) and the
Prometheus metrics (`nv_inference_*`); every API worker sends its images there (KServe v2, HTTP or
gRPC) instead of holding a model of its own.

The model's identity (version string, trained or random, backbone, precision, device) is
published as `parameters` of the model's Triton config, the place where a stock Triton keeps
static facts about a model too (`config.pbtxt`), so the API reads it the same way from both.

The speech and text detectors whose weights the tier has are bound beside it, one Triton model
each (`extra_models`, built by tier_detectors.py), with the same queue policy and batching window.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api.detector.config import DetectorConfig

if TYPE_CHECKING:
    from api.config import Settings

log = logging.getLogger(__name__)

MODEL_NAME = "d3"
INPUT_NAME = "images"
OUTPUT_NAME = "fake_probability"
# Model versions (api/detector/versions.py): a request may pin a head by its version id (one BYTES
# element per image, all the same; "" = the tier's active head, "configured" = D3_HEAD_WEIGHTS), and
# every image's answer names the model_version that scored it.
VERSION_INPUT = "head_version"
# The API sends the uint8 pixels its images were normalised from (a quarter of the bytes); the
# tier normalises them with the same function. A stock client sends the float32 `images`.
PIXEL_INPUT = "pixels"
VERSION_OUTPUT = "model_version"


@dataclass(frozen=True)
class TierConfig:
    """Where the tier listens and how Triton queues and batches (the D3_INFERENCE_* / D3_TRITON_* settings)."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 2000
    max_queue_size: int = 256
    queue_timeout_microseconds: int = 0
    instances: int = 1

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TierConfig:
        config = cls(
            host=settings.d3_inference_host,
            http_port=settings.d3_inference_http_port,
            grpc_port=settings.d3_inference_grpc_port,
            metrics_port=settings.d3_inference_metrics_port,
            max_batch_size=settings.d3_triton_max_batch_size,
            preferred_batch_sizes=tuple(sorted(set(settings.d3_triton_preferred_batch_size))),
            max_queue_delay_microseconds=settings.d3_triton_max_queue_delay_microseconds,
            max_queue_size=settings.d3_triton_max_queue_size,
            queue_timeout_microseconds=settings.d3_triton_queue_timeout_microseconds,
            instances=settings.d3_triton_instances,
        )
        return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


# ---------------------------------------------------------------- the libpython trap
def libpython_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-exec with when PyTriton's backend stub would load the wrong libpython.

    The Python-backend stub shipped in the wheel links `libpython3.X.so.1.0` dynamically, and the
    loader finds the system's copy first. Under an interpreter of another patch release (a pyenv
    or uv Python beside Debian's) the stub then runs this interpreter's standard library on the
    other release's C core and fails inside `multiprocessing.resource_tracker`. Putting the
    interpreter's own LIBDIR first on LD_LIBRARY_PATH makes the stub load the matching library;
    the variable is read only at process start, hence a re-exec. None when nothing needs changing
    (a static interpreter, or LIBDIR already first).
    """
    environ = os.environ if environ is None else environ
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    if not (Path(libdir) / library).exists():
        return None
    current = [p for p in environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if current[:1] == [libdir]:
        return None
    return {**environ, "LD_LIBRARY_PATH": ":".join([libdir, *[p for p in current if p != libdir]])}


def reexec_with_own_libpython() -> None:
    """Replace this process by the same command with LD_LIBRARY_PATH fixed (see libpython_env)."""
    env = libpython_env()
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    log.debug("re-executing with LD_LIBRARY_PATH=%s", env["LD_LIBRARY_PATH"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)  # noqa: S606 - the same interpreter and arguments, no shell


# ---------------------------------------------------------------- the model side
def identity_parameters(model: Any, device: Any) -> dict[str, str]:
    return {
        "d3_model_version": str(getattr(model, "model_version", "")),
        "d3_trained": "true" if getattr(model, "trained", False) else "false",
        "d3_backbone": str(getattr(model, "backbone", "")),
        "d3_precision": str(getattr(model, "precision", "")),
        "d3_device": str(device),
    }


def make_infer_function(model: Any, device: Any, heads: Any = None) -> Callable:
    """Triton's batched callable: images (N x 3 x 224 x 224 float32) or pixels (the same, uint8)
    [+ head_version (N x 1 bytes)]
    -> fake_probability (N x 1) and model_version (N x 1 bytes).

    `heads` (a HeadSwitcher): each request's rows are scored by the head it names, or by the one
    active when its batch runs; Triton never splits a request across batches, so one request gets
    one head. A version that cannot be loaded fails the batch (the API answers 503)."""
    import numpy as np
    import torch
    from pytriton.decorators import batch, group_by_keys

    from api.detector.preprocess import normalize_pixels
    from api.detector.versions import CONFIGURED, base_head, score_heads

    pin = getattr(device, "type", "cpu") == "cuda"
    configured = heads.base if heads is not None else base_head(model)

    def head_of(name: str, active: Any) -> Any:
        if not name:
            return active
        if name == CONFIGURED:
            return configured
        if heads is None:
            raise ValueError(f"model version {name!r} requested but this tier does not follow model versions")
        return heads.get(name)

    # Requests with different inputs (pixels or images, with or without a head) are batched apart:
    # @batch stacks only requests of the same inputs.
    @group_by_keys
    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        pixels = inputs.get(PIXEL_INPUT)
        images = normalize_pixels(pixels) if pixels is not None else inputs.get(INPUT_NAME)
        if images is None:
            raise ValueError(f"send {INPUT_NAME!r} (float32) or {PIXEL_INPUT!r} (uint8)")
        x = torch.from_numpy(images)
        if pin:  # page-locked host memory: the copy to the GPU runs asynchronously
            x = x.pin_memory()
        active = heads.active if heads is not None else configured  # read once for the whole batch
        names = inputs.get(VERSION_INPUT)
        wanted = [_text(row[0]) for row in names] if names is not None else [""] * len(images)
        loaded: dict[str, Any] = {}
        row_heads = [loaded.setdefault(name, head_of(name, active)) for name in wanted]
        with torch.inference_mode():
            p = np.asarray(score_heads(model, x.to(device, non_blocking=True), row_heads), dtype=np.float32)
        versions = np.array([[h.model_version.encode()] for h in row_heads], dtype=np.object_)
        return {OUTPUT_NAME: p.reshape(-1, 1), VERSION_OUTPUT: versions}

    return infer


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def warm_up(model: Any, device: Any, batch_size: int = 1) -> None:
    import torch

    with torch.inference_mode():
        model(torch.zeros((batch_size, 3, 224, 224), device=device))


# ---------------------------------------------------------------- the server
class InferenceTier:
    """Build, warm up and serve the model; `start()` returns once Triton reports the model ready."""

    def __init__(self, detector: DetectorConfig, tier: TierConfig, model: Any = None,
                 extra_models: Sequence[Any] = (), catalog: Any = None, poll_s: float = 2.0) -> None:
        self.detector = detector
        self.tier = tier
        self.model = model
        self.extra_models = tuple(extra_models)  # tier_detectors.TierBinding: AASIST, Fast-DetectGPT
        self.device: Any = None
        self.triton: Any = None
        self.catalog = catalog  # a HeadCatalog (api/services/model_versions.py): follow the active version
        self.poll_s = poll_s
        self.heads: Any = None

    def load(self) -> None:
        if self.model is None:
            from api.detector.factory import build_model

            self.model = build_model(self.detector)
        first = next(iter(self.model.parameters()))
        self.device = first.device
        warm_up(self.model, self.device)
        if self.catalog is not None:
            from api.detector.versions import HeadSwitcher, base_head

            self.heads = HeadSwitcher(base_head(self.model), int(self.model.head.dim), self.device, self.catalog,
                                      self.poll_s)
            self.heads.sync()  # the active version from the first request on
            self.heads.start()

    def start(self) -> None:
        import numpy as np
        from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction
        from pytriton.triton import Triton, TritonConfig

        if self.model is None:
            self.load()
        tier = self.tier
        triton_config = TritonConfig(
            http_address=tier.host, http_port=tier.http_port, grpc_address=tier.host, grpc_port=tier.grpc_port,
            metrics_address=tier.host, metrics_port=tier.metrics_port, allow_gpu_metrics=False,
            exit_timeout_secs=5, strict_readiness=True)
        queue_policy = QueuePolicy(
            timeout_action=TimeoutAction.REJECT,
            default_timeout_microseconds=tier.queue_timeout_microseconds,
            # A client may send its own deadline (the API sends D3_INFERENCE_TIMEOUT_S), so work it
            # has given up on is dropped from the queue instead of computed.
            allow_timeout_override=True,
            max_queue_size=tier.max_queue_size)
        batcher = DynamicBatcher(
            max_queue_delay_microseconds=tier.max_queue_delay_microseconds,
            preferred_batch_size=list(tier.preferred_batch_sizes) or None,
            default_queue_policy=queue_policy)
        self.triton = Triton(config=triton_config,
                             workspace=short_workspace([MODEL_NAME, *(m.model_name for m in self.extra_models)]))
        self.triton.bind(
            model_name=MODEL_NAME,
            # Several instances share the one model (its forward keeps no state): while one batch is
            # handed between Triton and this process, another computes (docs/PERFORMANCE.md).
            infer_func=[make_infer_function(self.model, self.device, self.heads) for _ in range(tier.instances)],
            inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=(3, 224, 224), optional=True),
                    Tensor(name=VERSION_INPUT, dtype=bytes, shape=(1,), optional=True),
                    Tensor(name=PIXEL_INPUT, dtype=np.uint8, shape=(3, 224, 224), optional=True)],
            outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(1,)),
                     Tensor(name=VERSION_OUTPUT, dtype=bytes, shape=(1,))],
            config=ModelConfig(max_batch_size=tier.max_batch_size, batcher=batcher),
            strict=True,
        )
        _publish_parameters(self.triton, MODEL_NAME, identity_parameters(self.model, self.device))
        # The same queue and window; no preferred sizes (D³'s image batch sizes mean nothing here).
        extra_batcher = DynamicBatcher(max_queue_delay_microseconds=tier.max_queue_delay_microseconds,
                                       default_queue_policy=queue_policy)
        for extra in self.extra_models:
            self.triton.bind(model_name=extra.model_name, infer_func=extra.infer_func, inputs=extra.inputs,
                             outputs=extra.outputs,
                             config=ModelConfig(max_batch_size=tier.max_batch_size, batcher=extra_batcher),
                             strict=True)
            _publish_parameters(self.triton, extra.model_name, extra.parameters)
        self.triton.run()  # returns when Triton says the model is ready

    def serve_forever(self) -> bool:
        """Block until SIGTERM/SIGINT (True) or until Triton or its model backend died (False)."""
        assert self.triton is not None
        stopped = False

        def terminate(signum: int, frame: Any) -> None:
            nonlocal stopped
            stopped = True
            raise KeyboardInterrupt  # Triton.serve() stops the server on it

        signal.signal(signal.SIGTERM, terminate)
        signal.signal(signal.SIGINT, terminate)
        self.triton.serve()
        return stopped

    def stop(self) -> None:
        if self.heads is not None:
            self.heads.stop()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    def urls(self) -> dict[str, str]:
        host = self.tier.host if self.tier.host not in ("0.0.0.0", "::") else socket.gethostname()  # noqa: S104
        return {"http": f"http://{host}:{self.tier.http_port}", "grpc": f"grpc://{host}:{self.tier.grpc_port}",
                "metrics": f"http://{host}:{self.tier.metrics_port}/metrics"}


def short_workspace(model_names: Sequence[str]) -> str | None:
    """A workspace whose Unix socket paths fit, or None for PyTriton's default.

    PyTriton makes sockets named after each model in its workspace (<PYTRITON_HOME>/workspace_XXXXXXXX/
    <model>_0_0-server.sock); a deep PYTRITON_HOME (a HOME on a long volume path) plus a long model
    name passes the 107 bytes a socket path may have, and the model fails to load. Then the
    workspace goes under the temporary folder instead (PyTriton removes it when it stops)."""
    import tempfile
    import uuid

    from pytriton.constants import PYTRITON_HOME

    longest = max(len(f"{name}_0_0-server.sock") for name in model_names)
    if len(str(PYTRITON_HOME)) + len("/workspace_XXXXXXXX/") + longest <= 107:
        return None
    return os.path.join(tempfile.gettempdir(), f"pytriton-{uuid.uuid4().hex[:8]}")


def _publish_parameters(triton: Any, model_name: str, parameters: dict[str, str]) -> None:
    # PyTriton 0.7's public ModelConfig has no `parameters`; the Triton config it generates is
    # built once per bound model and cached, and its backend_parameters become the config's
    # `parameters` map. Adding ours there before run() is the least intrusive way to publish them;
    # if PyTriton changes this, fail loudly rather than serve a tier without an identity.
    try:
        models = [m for m in triton._model_manager.models if m.model_name == model_name]
        config = models[0]._get_triton_model_config()
        config.backend_parameters.update(parameters)
    except (AttributeError, IndexError) as exc:  # pragma: no cover - depends on PyTriton's internals
        raise RuntimeError(f"cannot publish the model identity through this PyTriton version: {exc}") from exc


def notify_systemd(state: str) -> None:
    """sd_notify(3) without a library: one datagram to $NOTIFY_SOCKET, when systemd set one.

    (Hand-written: the protocol is one datagram, and python-systemd needs a C build.)"""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
