"""`d3 serve-inference`: the model's own tier (Triton through PyTriton), shared by every API worker."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from api.detector.commands import _config, _load_model, _settings, model_options

# settings -> (a HeadCatalog or None, why not): how the tier reaches the API's model versions. Set by
# api/cli.py (the wiring) so this package never imports the services; None: versions off.
CatalogFactory = Callable[[Any], tuple[Any, str]]
_catalog_factory: CatalogFactory | None = None


def register(cli: click.Group, catalog_factory: CatalogFactory | None = None) -> None:
    global _catalog_factory
    _catalog_factory = catalog_factory
    cli.add_command(serve_inference)
    cli.add_command(export_onnx)


@click.command("serve-inference")
@model_options
@click.option("--host", default=None, help="address to listen on [D3_INFERENCE_HOST]")
@click.option("--http-port", type=click.IntRange(1, 65535), default=None,
              help="KServe v2 HTTP [D3_INFERENCE_HTTP_PORT]")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None,
              help="KServe v2 gRPC [D3_INFERENCE_GRPC_PORT]")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Prometheus metrics [D3_INFERENCE_METRICS_PORT]")
def serve_inference(host: str | None, http_port: int | None, grpc_port: int | None, metrics_port: int | None,
                    **options: Any) -> None:
    """Serve the D3 model, and the AASIST and Fast-DetectGPT detectors, with Triton Inference Server.

    Same model settings as the API (D3_BACKBONE, D3_CLIP_WEIGHTS, D3_HEAD_WEIGHTS, D3_SHUFFLE_SEED,
    D3_DEVICE, D3_PRECISION); batching and queue from D3_TRITON_*. Point the API at it with
    D3_INFERENCE_URL=grpc://HOST:GRPC_PORT. The model's readiness (/v2/models/d3/ready) is 200 only
    after it is loaded and one warm-up forward has run; Triton's server-wide /v2/health/ready can be
    200 a moment before the models are bound, so probes should ask the model. The speech and text
    detectors (AASIST_*, TEXT_* settings) are served beside it as the models `aasist` and
    `fast_detectgpt`, each one whose weights are here; a modality whose weights are missing is not
    served, and this says why. The D3 backbone's two-view features are served as `d3_features`
    (for `d3 features`), from the same model.
    """
    from api.detector import tier_detectors, triton_server
    from api.detector.errors import DetectorError

    # Before anything heavy: the backend stub must find this interpreter's libpython (see there).
    triton_server.reexec_with_own_libpython()
    settings = _settings(options)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tier_config = triton_server.TierConfig.from_settings(
        settings, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    ports = {tier_config.http_port, tier_config.grpc_port, tier_config.metrics_port}
    if len(ports) != 3:
        raise click.UsageError("the HTTP, gRPC and metrics ports must differ")
    # The tier follows the API's active model version when it can reach the API's database.
    catalog, why_not = _catalog_factory(settings) if _catalog_factory else (None, "not wired")
    if catalog is None:
        click.echo(f"d3 inference tier: model versions off ({why_not}); serving D3_HEAD_WEIGHTS", err=True)
    tier = triton_server.InferenceTier(_config(options), tier_config, catalog=catalog,
                                       poll_s=settings.model_version_poll_s)
    click.echo(f"d3 inference tier: loading {settings.d3_backbone} ...", err=True)
    try:
        tier.load()
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo("d3 inference tier: loading the speech and text detectors (AASIST_*, TEXT_*) ...", err=True)
    tier.extra_models, not_served = tier_detectors.load_bindings(settings)
    # The backbone's features for `d3 features` (remote_features.py), from the model just loaded.
    tier.extra_models = [*tier.extra_models, tier_detectors.features_binding(tier.model, tier.device)]
    try:
        tier.start()
    except Exception as exc:  # a port in use, Triton failing to start: say so, exit non-zero
        tier.stop()
        raise click.ClickException(f"Triton did not start: {type(exc).__name__}: {exc}") from exc
    urls = tier.urls()
    model = tier.model
    click.echo(f"d3 inference tier ready: model {triton_server.MODEL_NAME} = {model.model_version} "
               f"({'trained' if model.trained else 'RANDOM, UNTRAINED weights'}) on {tier.device}")
    click.echo(f"  KServe v2 HTTP  {urls['http']}  (ready: {urls['http']}/v2/models/{triton_server.MODEL_NAME}/ready)")
    click.echo(f"  KServe v2 gRPC  {urls['grpc']}  (API: D3_INFERENCE_URL={urls['grpc']})")
    click.echo(f"  metrics         {urls['metrics']}")
    for extra in tier.extra_models:
        detector = extra.detector
        click.echo(f"  model {extra.model_name} ({extra.modality}) = {detector.model_version} "
                   f"({'trained' if detector.trained else 'RANDOM, UNTRAINED weights'})")
    for modality, reason in not_served.items():
        click.echo(f"  {modality}: NOT SERVED: {reason}")
    sys.stdout.flush()
    triton_server.notify_systemd("READY=1")
    try:
        stopped = tier.serve_forever()
    finally:
        triton_server.notify_systemd("STOPPING=1")
        tier.stop()
    if not stopped:  # Triton or the model backend died: exit non-zero so systemd restarts the tier
        raise click.ClickException("Triton Inference Server stopped unexpectedly")


@click.command("export-onnx")
@model_options
@click.option("--out", "repository", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Triton model repository to write <model-name>/config.pbtxt and <model-name>/1/model.onnx into")
@click.option("--model-name", default="d3", show_default=True, help="the model's name in the repository "
              "(the API's D3_INFERENCE_MODEL)")
@click.option("--max-batch-size", type=click.IntRange(1, 4096), default=None,
              help="Triton's max_batch_size [D3_TRITON_MAX_BATCH_SIZE]")
@click.option("--check-images", type=click.IntRange(0, 256), default=4, show_default=True,
              help="seeded random images ONNX Runtime scores against PyTorch before the export is kept (0: skip)")
@click.option("--input", "input_kind", type=click.Choice(["images", "pixels"]), default="images", show_default=True,
              help="what the model takes: float32 normalised `images`, or uint8 `pixels` it normalises itself "
                   "(a quarter of the bytes, and less CPU in the API)")
def export_onnx(repository: Path, model_name: str, max_batch_size: int | None, check_images: int, input_kind: str,
                **options: Any) -> None:
    """Export the D3 model (one head, fixed) as ONNX for a stock Triton or a TensorRT build.

    Same model settings as the API; exports in fp32 on the CPU. Writes a model repository a stock
    Triton serves with its ONNX Runtime backend (`tritonserver --model-repository OUT`), publishing
    the model's identity as the PyTriton tier does; `trtexec --onnx=.../model.onnx --fp16` makes the
    TensorRT engine (DEPLOYMENT.md). Refuses an export whose scores differ from PyTorch.
    """
    from api.detector.config import DetectorConfig
    from api.detector.errors import DetectorError
    from api.detector.onnx_export import export_model_repository

    settings = _settings({**options, "d3_device": "cpu", "d3_precision": "fp32"})
    model = _load_model(DetectorConfig.from_settings(settings))
    try:
        report = export_model_repository(
            model, repository, model_name=model_name,
            max_batch_size=max_batch_size or settings.d3_triton_max_batch_size,
            preferred_batch_sizes=tuple(settings.d3_triton_preferred_batch_size or ()),
            check_images=check_images, pixels=input_kind == "pixels")
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"exported {report.parameters['d3_model_version']} to {report.model_dir}")
    if report.max_abs_difference is not None:
        click.echo(f"ONNX Runtime vs PyTorch on {check_images} images: "
                   f"max |difference| {report.max_abs_difference:.2e}")
    if report.parameters["d3_trained"] != "true":
        click.echo("warning: this model is untrained (random weights): its scores mean nothing", err=True)
    click.echo(f"serve it: tritonserver --model-repository {repository}; then D3_INFERENCE_URL=grpc://HOST:8001"
               f" D3_INFERENCE_MODEL={model_name}")
