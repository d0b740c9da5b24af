"""Prometheus metrics and `GET /metrics`.

With PROMETHEUS_MULTIPROC_DIR set (Gunicorn: set it in the environment before start), every
worker writes its samples to files in that folder and a scrape of any worker reports the sum of
all of them (prometheus_client's multiprocess mode). Without it, this process's own samples.
gunicorn_config.py must put the variable in os.environ before the workers fork, empty the folder
when the master starts (`on_starting`) and mark each dead worker (`child_exit` calling
prometheus_client.multiprocess.mark_process_dead), or stale samples are counted again.

`/metrics` answers callers from METRICS_ALLOW networks (client address after the one trusted
proxy hop) and callers with an admin key; others get 401 (no key) or 403 (a non-admin key).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from api.auth import current_caller, unauthorized
from api.context import services
from api.database import DatabaseUnavailable
from api.detector.interface import Engine
from api.errors import error_response
from api.openapi import Response as Responses
from api.openapi import ViewResult, api_spec, produces
from api.schemas import ErrorBody
from api.services.jobs import STATUSES, JobStore

log = logging.getLogger(__name__)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# Our metric objects live here, not in the global default registry, so nothing else (a library's
# own metrics) leaks into the exposition and tests can build several apps in one process.
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PROBABILITY_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))

REQUESTS = Counter("d3_http_requests", "HTTP requests by endpoint, method and status.",
                   ["endpoint", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("d3_http_request_duration_seconds", "Time from request start to response, by endpoint.",
                    ["endpoint"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PREDICTIONS = Counter("d3_predictions", "Verdicts returned, by label and media type (reused results included).",
                      ["label", "media_type"], registry=REGISTRY)
FAKE_PROBABILITY = Histogram("d3_fake_probability", "Fake probability of returned verdicts.",
                             ["media_type"], buckets=_PROBABILITY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram("d3_inference_batch_size", "Images per forward pass of the batching engine.",
                       buckets=_BATCH_BUCKETS, registry=REGISTRY)
FORWARD_SECONDS = Histogram("d3_inference_forward_seconds", "Duration of one batched forward pass.",
                            buckets=_FORWARD_BUCKETS, registry=REGISTRY)
QUEUE_DEPTH = Gauge("d3_inference_queue_depth", "Images waiting for the engine (summed over live workers).",
                    registry=REGISTRY, multiprocess_mode="livesum")
MODEL_LOAD_SECONDS = Gauge("d3_model_load_seconds", "Seconds the model took to load (engine start to ready).",
                           registry=REGISTRY, multiprocess_mode="livemax")
MODEL_READY = Gauge("d3_model_ready", "1 when every live worker's model is ready.",
                    registry=REGISTRY, multiprocess_mode="livemin")
GPU_MEMORY = Gauge("d3_gpu_memory_allocated_bytes", "GPU memory allocated by PyTorch (0 without CUDA), summed.",
                   registry=REGISTRY, multiprocess_mode="livesum")

PREDICTION_BLUEPRINTS = ("predict", "video")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_instrumented_engines: weakref.WeakSet = weakref.WeakSet()
_engines_lock = threading.Lock()

bp = Blueprint("metrics", __name__)


# -- what a response says about predictions (also used by the request log) -------------------
def prediction_results(response: Response) -> list[dict[str, Any]]:
    """The verdicts in a prediction response: [{label, media_type, fake_probability}], cached per request."""
    cached = g.get("_d3_prediction_results")
    if cached is not None:
        return cached
    results: list[dict[str, Any]] = []
    if (request.method == "POST" and request.blueprint in PREDICTION_BLUEPRINTS
            and response.status_code in (200, 201) and response.is_json):
        body = response.get_json(silent=True)
        items = body.get("results") if isinstance(body, dict) and isinstance(body.get("results"), list) else [body]
        for item in items:
            if isinstance(item, dict) and item.get("prediction") in ("fake", "real"):
                results.append({"label": item["prediction"], "media_type": str(item.get("media_type") or "image"),
                                "fake_probability": item.get("fake_probability")})
    g._d3_prediction_results = results
    return results


# -- engine instrumentation ------------------------------------------------------------------
def _gpu_memory(engine: Any) -> int:
    torch = sys.modules.get("torch")
    device = getattr(engine, "device", None)
    if torch is None or device is None or getattr(device, "type", "cpu") != "cuda":
        return 0
    try:
        return int(torch.cuda.memory_allocated(device))
    except Exception:  # a broken CUDA context must not break a scrape
        return 0


# The engine gauges are process-wide objects while a process may hold several engines (tests,
# benchmarks): they are written only from one engine's own state, under this lock, and a scrape
# refreshes them from its app's engine and renders them under the same lock, so it never reports
# another engine's values.
_GAUGES_LOCK = threading.RLock()


def refresh_engine_gauges(engine: Engine) -> None:
    with _GAUGES_LOCK:
        QUEUE_DEPTH.set(engine.stats().get("queue_depth", 0))
        GPU_MEMORY.set(_gpu_memory(engine))
        MODEL_READY.set(1 if engine.ready else 0)
        MODEL_LOAD_SECONDS.set(getattr(engine, "load_seconds", None) or 0.0)


def instrument_engine(engine: Engine) -> None:
    """Batch metrics via the engine's listener hook, once per engine however many apps share it."""
    with _engines_lock:
        if engine in _instrumented_engines:
            return
        _instrumented_engines.add(engine)

    def on_batch(batch_size: int, forward_seconds: float) -> None:
        BATCH_SIZE.observe(batch_size)
        FORWARD_SECONDS.observe(forward_seconds)
        refresh_engine_gauges(engine)

    engine.add_batch_listener(on_batch)
    refresh_engine_gauges(engine)
    if not engine.ready:
        # In multiprocess mode a worker's gauges are its files: write them once the model is
        # ready, even if this worker is never scraped itself.
        threading.Thread(target=lambda: (engine.wait_ready(None), refresh_engine_gauges(engine)),
                         name="d3-metrics-model-load", daemon=True).start()


# -- scrape ----------------------------------------------------------------------------------
class VideoJobsCollector:
    """Video jobs by status and the job queue, read from the database at scrape time (every
    process, API or worker, agrees). The queue's length and its oldest job's age are what an
    autoscaler scales the worker tier on."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            stats = self.jobs.stats()
        except DatabaseUnavailable:
            log.warning("metrics: database unavailable, d3_video_jobs left out of this scrape")
            return
        family = GaugeMetricFamily("d3_video_jobs", "Video predictions by status (from the database).",
                                   labels=["status"])
        for status in STATUSES:
            family.add_metric([status], stats.counts.get(status, 0))
        yield family
        yield GaugeMetricFamily("d3_video_queue_length", "Video jobs waiting for a worker (status queued).",
                                value=stats.queued)
        yield GaugeMetricFamily("d3_video_queue_oldest_age_seconds",
                                "Age of the oldest video job still waiting for a worker (0 when none waits).",
                                value=round(stats.oldest_queued_age_s, 3))


class _Forward:
    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self):
        return self.source.collect()


def exposition() -> bytes:
    svc = services()
    registry = CollectorRegistry()
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(REGISTRY))
    jobs = CollectorRegistry()
    jobs.register(VideoJobsCollector(svc.jobs))
    with _GAUGES_LOCK:  # held briefly: the engine's thread takes it after every batch
        refresh_engine_gauges(svc.engine)
        samples = generate_latest(registry)
    return samples + generate_latest(jobs)


def _allowed(address: str | None, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


@bp.get("/metrics")
@produces(200, CONTENT_TYPE_LATEST.split(";")[0], schema={"type": "string"})
@api_spec.validate(tags=["service"], operation_id="getMetrics",
                   security=[{}, {"bearerAuth": []}, {"apiKeyHeader": []}], resp=Responses(
    HTTP_200=(None, "Prometheus text format"),
    HTTP_401=(ErrorBody, "Not from an allow-listed network, and no valid key"),
    HTTP_403=(ErrorBody, "A valid key that is not an admin key, from a network not allow-listed")))
def metrics() -> ViewResult:
    """Prometheus metrics (allow-listed networks or an admin key)"""
    caller = current_caller()
    if not (caller.is_admin or _allowed(request.remote_addr, services().settings.metrics_allow)):
        if caller.owner is None:
            return unauthorized(None)
        return error_response(403, "forbidden", "/metrics needs an admin key or an allow-listed network")
    return Response(exposition(), content_type=CONTENT_TYPE_LATEST)


# -- wiring ----------------------------------------------------------------------------------
def init_app(app: Flask) -> None:
    instrument_engine(app.extensions["d3"].engine)
    app.register_blueprint(bp)

    @app.before_request
    def _start_timer() -> None:
        g._d3_metrics_started = time.perf_counter()

    @app.after_request
    def _observe(response: Response) -> Response:
        started = g.get("_d3_metrics_started")
        endpoint = request.endpoint or "unmatched"  # never the raw path: bounded label values
        method = request.method if request.method in METHODS else "other"
        REQUESTS.labels(endpoint, method, str(response.status_code)).inc()
        if started is not None:
            LATENCY.labels(endpoint).observe(time.perf_counter() - started)
        for result in prediction_results(response):
            PREDICTIONS.labels(result["label"], result["media_type"]).inc()
            probability = result.get("fake_probability")
            if isinstance(probability, (int, float)):
                FAKE_PROBABILITY.labels(result["media_type"]).observe(float(probability))
        return response
