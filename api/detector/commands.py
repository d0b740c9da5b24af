"""`d3 predict`, `d3 eval`, `d3 fetch-weights`, `d3 info`: the model from the command line.

Every model setting has a flag that overrides the environment / .env value. `fetch-weights` and
`info` cover every modality (`--modality`, default all): image (D³, also video), audio (AASIST)
and text (Fast-DetectGPT's two LMs; modality_weights.py), the last two from their own settings.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from api.detector.config import DetectorConfig

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".avif"})
F = TypeVar("F", bound=Callable[..., Any])

_MODEL_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--backbone", "d3_backbone", str, "open_clip model name [D3_BACKBONE]"),
    ("--clip-weights", "d3_clip_weights", str, "'openai', a checkpoint file, or random:<seed> [D3_CLIP_WEIGHTS]"),
    ("--head-weights", "d3_head_weights", str, "head checkpoint file, https URL, or random:<seed> [D3_HEAD_WEIGHTS]"),
    ("--shuffle-seed", "d3_shuffle_seed", click.IntRange(min=0), "seed of the patch permutation [D3_SHUFFLE_SEED]"),
    ("--device", "d3_device", str, "auto, cpu, cuda or cuda:N [D3_DEVICE]"),
    ("--precision", "d3_precision", click.Choice(["auto", "fp32", "fp16", "bf16"]), "[D3_PRECISION]"),
    ("--cache-dir", "d3_cache_dir", str, "weights cache, default ~/.cache/d3 [D3_CACHE_DIR]"),
]


def model_options(fn: F) -> F:
    """Add the model-setting flags; they arrive as d3_* keyword arguments (None = not given)."""
    for flag, name, kind, help_text in reversed(_MODEL_OPTIONS):
        fn = click.option(flag, name, type=kind, default=None, help=help_text)(fn)
    return fn


def _settings(options: dict[str, Any]) -> Any:
    from api.config import ConfigError, load_settings

    overrides = {k: v for k, v in options.items() if k.startswith("d3_") and v is not None}
    try:
        return load_settings(overrides)
    except ConfigError as exc:
        raise click.UsageError(f"configuration error: {exc}") from exc


def _config(options: dict[str, Any]) -> DetectorConfig:
    return DetectorConfig.from_settings(_settings(options))


def _load_model(config: DetectorConfig) -> Any:
    from api.detector.errors import DetectorError
    from api.detector.factory import build_model

    try:
        return build_model(config)
    except DetectorError as exc:
        raise click.ClickException(str(exc)) from exc


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_image(path: Path, *, max_pixels: int, jpeg_quality: int | None = None,
                blur_sigma: float | None = None) -> tuple[Any, tuple[str, ...]]:
    """File -> (preprocessed tensor, notes), decoded exactly as the API decodes an upload.

    Perturbations (spec §6) in the authors' order: blur, then JPEG.
    """
    from api.detector.preprocess import gaussian_blur, jpeg_reencode, preprocess_image
    from api.utils.images import decode_image

    decoded = decode_image(path.read_bytes(), max_pixels)  # the service's format policy and limits
    img = decoded.image.convert("RGB")
    if blur_sigma is not None:
        img = gaussian_blur(img, blur_sigma)
    if jpeg_quality is not None:
        img = jpeg_reencode(img, jpeg_quality)
    return preprocess_image(img), decoded.notes


def _reason(exc: Exception) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def _score(model: Any, tensors: list[Any]) -> list[float]:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return model(torch.stack(tensors).to(device)).float().cpu().tolist()


def _verdict(p: float, threshold: float) -> tuple[str, float]:
    # The authors call an image fake when p > 0.5; confidence is the probability of the verdict.
    return ("fake", p) if p > threshold else ("real", 1.0 - p)


# ---------------------------------------------------------------- d3 predict
@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="call an image fake when its probability is above this")
@model_options
def predict(files: tuple[Path, ...], threshold: float, **options: Any) -> None:
    """Score image FILEs: one JSON object per file per line."""
    settings = _settings(options)
    config = DetectorConfig.from_settings(settings)
    model = _load_model(config)
    failed = False
    for chunk in _chunks(files, config.max_batch_size):
        lines: dict[int, dict[str, Any]] = {}
        tensors, positions, notes = [], [], {}
        for i, path in enumerate(chunk):
            try:
                tensor, notes[i] = _read_image(path, max_pixels=settings.max_image_pixels)
                tensors.append(tensor)
                positions.append(i)
            except Exception as exc:  # unreadable or refused: report it, keep going with the others
                lines[i] = {"file": str(path), "error": f"cannot read image: {_reason(exc)}"}
                failed = True
        for i, p in zip(positions, _score(model, tensors) if tensors else [], strict=True):
            prediction, confidence = _verdict(p, threshold)
            lines[i] = {"file": str(chunk[i]), "fake_probability": p, "prediction": prediction,
                        "confidence": confidence, "model_version": model.model_version, "trained": model.trained,
                        "notes": list(notes[i])}
        for i in range(len(chunk)):
            click.echo(json.dumps(lines[i]))
    if failed:
        sys.exit(1)


# ---------------------------------------------------------------- d3 eval
def list_labelled_images(directory: Path, max_per_class: int | None = None) -> list[tuple[Path, int]]:
    """(file, label) for images under DIR/real (0) and DIR/fake (1), recursively, sorted."""
    found: list[tuple[Path, int]] = []
    for name, label in (("real", 0), ("fake", 1)):
        folder = directory / name
        if not folder.is_dir():
            raise click.UsageError(f"{directory} must contain real/ and fake/ subfolders ({folder} is missing)")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        found += [(p, label) for p in files[:max_per_class]]
    return found


def summarize(labels: list[int], scores: list[float], threshold: float) -> dict[str, Any]:
    from api.detector.metrics import accuracies, average_precision, best_threshold

    acc, real_acc, fake_acc = accuracies(labels, scores, threshold)
    best_t, best_acc = best_threshold(labels, scores, prefer=threshold)
    return {"images": len(labels), "real": labels.count(0), "fake": labels.count(1),
            "ap": average_precision(labels, scores), "threshold": threshold, "accuracy": acc,
            "real_accuracy": real_acc, "fake_accuracy": fake_acc, "best_threshold": best_t,
            "best_accuracy": best_acc}


def _open_out(target: str) -> Any:
    return open(target, "w", newline="", encoding="utf-8") if target != "-" else sys.stdout  # noqa: SIM115


@click.command("eval")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None,
              help="re-encode every image as JPEG at this quality first (Pillow)")
@click.option("--blur-sigma", type=click.FloatRange(min=0), default=None,
              help="Gaussian blur (scipy, per channel) with this sigma first, before the resize")
@click.option("--max-per-class", type=click.IntRange(min=1), default=None, help="use at most N real and N fake")
@click.option("--json", "json_out", default=None, metavar="PATH",
              help="write the summary and per-file scores as JSON ('-' = stdout)")
@click.option("--csv", "csv_out", default=None, metavar="PATH", help="write per-file scores as CSV ('-' = stdout)")
@click.option("--progress/--no-progress", default=True, show_default=True, help="progress bar on stderr")
@model_options
def eval_command(directory: Path, threshold: float, jpeg_quality: int | None, blur_sigma: float | None,
                 max_per_class: int | None, json_out: str | None, csv_out: str | None, progress: bool,
                 **options: Any) -> None:
    """Evaluate on DIRECTORY/real and DIRECTORY/fake: AP, accuracies, best threshold."""
    from tqdm import tqdm

    items = list_labelled_images(directory, max_per_class)
    if not items:
        raise click.UsageError(f"no images found under {directory}/real or {directory}/fake")
    settings = _settings(options)
    config = DetectorConfig.from_settings(settings)
    model = _load_model(config)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    with tqdm(total=len(items), unit="img", file=sys.stderr, disable=not progress) as bar:
        for chunk in _chunks(items, config.max_batch_size):
            tensors, kept = [], []
            for path, label in chunk:
                try:
                    tensor, _ = _read_image(path, max_pixels=settings.max_image_pixels, jpeg_quality=jpeg_quality,
                                            blur_sigma=blur_sigma)
                    tensors.append(tensor)
                    kept.append((path, label))
                except Exception as exc:
                    errors.append({"file": str(path), "error": f"cannot read image: {_reason(exc)}"})
            for (path, label), p in zip(kept, _score(model, tensors) if tensors else [], strict=True):
                rows.append({"file": str(path), "label": "fake" if label else "real", "fake_probability": p,
                             "prediction": _verdict(p, threshold)[0]})
            bar.update(len(chunk))
    if not rows:
        raise click.ClickException("none of the images could be read")
    labels = [1 if r["label"] == "fake" else 0 for r in rows]
    summary = summarize(labels, [r["fake_probability"] for r in rows], threshold)
    summary.update({"unreadable": len(errors), "jpeg_quality": jpeg_quality, "blur_sigma": blur_sigma,
                    "model_version": model.model_version, "trained": model.trained})
    _write_eval_outputs(summary, rows, errors, json_out, csv_out)


def _write_eval_outputs(summary: dict[str, Any], rows: list[dict[str, Any]], errors: list[dict[str, str]],
                        json_out: str | None, csv_out: str | None) -> None:
    # Human summary goes to stdout unless a machine output claimed stdout.
    human = sys.stderr if "-" in (json_out, csv_out) else sys.stdout
    for error in errors:
        click.echo(f"warning: {error['file']}: {error['error']}", err=True)
    if not summary["trained"]:
        click.echo("warning: random weights (trained: false) - these scores mean nothing", err=True)

    def pct(x: float) -> str:
        return "n/a" if math.isnan(x) else f"{100 * x:.2f} %"

    click.echo(
        f"model: {summary['model_version']}\n"
        f"images: {summary['images']} ({summary['real']} real, {summary['fake']} fake, "
        f"{summary['unreadable']} unreadable)\n"
        f"AP: {pct(summary['ap'])}\n"
        f"accuracy @ {summary['threshold']:g}: {pct(summary['accuracy'])} "
        f"(real {pct(summary['real_accuracy'])}, fake {pct(summary['fake_accuracy'])})\n"
        f"best threshold: {summary['best_threshold']:.6g} (accuracy {pct(summary['best_accuracy'])})",
        file=human)
    if json_out:
        out = _open_out(json_out)
        try:
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
            json.dump({"summary": clean, "files": rows, "errors": errors}, out, indent=2)
            out.write("\n")
        finally:
            if out is not sys.stdout:
                out.close()
    if csv_out:
        out = _open_out(csv_out)
        try:
            writer = csv.DictWriter(out, fieldnames=["file", "label", "fake_probability", "prediction"])
            writer.writeheader()
            writer.writerows(rows)
        finally:
            if out is not sys.stdout:
                out.close()


# ---------------------------------------------------------------- d3 fetch-weights
def _manual_instructions(config: DetectorConfig) -> str:
    from api.detector.weights import AUTHORS_HEAD_URL, HEAD_FILENAME

    cache = config.resolved_cache_dir
    return (
        "To place the weights by hand (from a machine with internet access):\n"
        f"  1. backbone: download the Hugging Face repo timm/vit_large_patch14_clip_224.openai into\n"
        f"     {cache / 'huggingface'}  (e.g. `hf download timm/vit_large_patch14_clip_224.openai "
        f"open_clip_model.safetensors --cache-dir {cache / 'huggingface'}` and copy that folder over),\n"
        "     or copy OpenAI's ViT-L-14.pt (as clip.load caches it in ~/.cache/clip) anywhere and set\n"
        "     D3_CLIP_WEIGHTS=/path/to/ViT-L-14.pt\n"
        f"  2. head: download {AUTHORS_HEAD_URL}\n"
        f"     to {cache / HEAD_FILENAME}  (or anywhere, and set D3_HEAD_WEIGHTS=/path/to/classifier.pth)\n"
        "Then run `d3 info --modality image` to check that they load (it exits 0 when both do)."
    )


def _all_loadable(report: dict[str, dict[str, Any]]) -> bool:
    return all(entry.get("loadable") for entry in report.values())


MODALITY_CHOICES = ("image", "audio", "text")
modality_option = click.option(
    "--modality", "modalities", multiple=True, type=click.Choice(MODALITY_CHOICES),
    help="image (D3, also video), audio (AASIST: AASIST_* settings) or text (Fast-DetectGPT: TEXT_* settings); "
         "repeat for several [default: all]")


@click.command("fetch-weights")
@click.option("--if-missing", is_flag=True, help="exit 0 at once when every part is already present and loads")
@modality_option
@model_options
def fetch_weights(if_missing: bool, modalities: tuple[str, ...], **options: Any) -> None:
    """Download every modality's weights into the cache and check they load: the OpenAI ViT-L/14
    and the authors' D3 head, the authors' AASIST checkpoint, and the two text LMs (large: pick
    modalities with --modality)."""
    from api.detector import modality_weights, weights

    selected = modalities or MODALITY_CHOICES
    settings = _settings(options)
    config = DetectorConfig.from_settings(settings)
    others = [m for m in modality_weights.MODALITIES if m in selected]
    if if_missing:
        report = weights.verify_weights(config) if "image" in selected else {}
        reports = [modality_weights.report(m, settings) for m in others]
        if _all_loadable(report) and all(r["ok"] for r in reports):
            for part, entry in report.items():
                click.echo(f"{part}: present ({entry['path'] or entry['value']})")
            for r in reports:
                for part in r["parts"]:
                    click.echo(modality_weights.describe_part(r["modality"], part))
            return
    failed = "image" in selected and not _fetch_image_weights(config)
    for modality in others:
        problems = modality_weights.fetch(modality, settings, click.echo)
        r = modality_weights.report(modality, settings)
        for part in r["parts"]:
            click.echo(modality_weights.describe_part(modality, part) + ("" if part["state"] in ("present", "random")
                                                                      else f"  NOT USABLE: {part['error']}"))
        if r["error"]:
            click.echo(f"{modality}: NOT USABLE: {r['error']}")
        if not r["ok"]:
            failed = True
            for problem in problems:
                click.echo(f"  - {problem}", err=True)
    if failed:
        sys.exit(1)


def _fetch_image_weights(config: DetectorConfig) -> bool:
    """D3's two parts: download what is missing, report each, True when both load."""
    from api.detector import weights

    plan = weights.resolve_weights(config, download=False)
    problems: list[str] = []
    if plan.backbone.kind == "tag" and not plan.backbone.present:
        click.echo(f"downloading backbone weights ({config.backbone}, {config.clip_weights}) ...")
        try:
            weights.download_pretrained(config)
        except weights.WeightsError as exc:
            problems.append(str(exc))
    head = plan.head
    if head.kind == "file" and not head.spec and not head.present:  # default: the authors' checkpoint
        click.echo(f"downloading the authors' head checkpoint {weights.AUTHORS_HEAD_URL} ...")
        try:
            weights.download_file(weights.AUTHORS_HEAD_URL, head.path)
        except weights.WeightsError as exc:
            problems.append(str(exc))
    elif head.kind == "url" and not head.present:
        click.echo(f"downloading head checkpoint {head.spec} ...")
        try:
            weights.download_file(head.spec, head.path)
        except weights.WeightsError as exc:
            problems.append(str(exc))
    report = weights.verify_weights(config)
    for part, entry in report.items():
        # The error's own hint is "run `d3 fetch-weights`": this command, which just tried; the
        # instructions below say what to do instead.
        error = (entry.get("error") or "").replace(f"To fix: {weights.FETCH_HINT}, or",
                                                   "To fix: place it by hand as below, or")
        status = "OK" if entry.get("loadable") else f"NOT USABLE: {error}"
        click.echo(f"{part}: {entry.get('path') or entry.get('value')}  {status}")
    if _all_loadable(report):
        return True
    if problems:
        click.echo("Could not download the weights (this machine looks offline or the host is unreachable):",
                   err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
    click.echo(_manual_instructions(config), err=True)
    return False


# ---------------------------------------------------------------- d3 info
@click.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@modality_option
@model_options
def info(as_json: bool, modalities: tuple[str, ...], **options: Any) -> None:
    """Resolved model settings, device, model version, and whether the weights are present and load,
    for each modality; exits 1 when a selected modality's weights are missing or do not load."""
    from api.detector import modality_weights

    selected = modalities or MODALITY_CHOICES
    settings = _settings(options)
    data = _image_info(settings) if "image" in selected else {}
    others = {m: modality_weights.report(m, settings) for m in modality_weights.MODALITIES if m in selected}
    for modality, r in others.items():
        prefix = modality_weights.SETTING_PREFIX[modality]
        r["settings"] = {k: v for k, v in settings.public_view().items() if k.startswith(prefix)}
    data["modalities"] = others
    ok = data.get("weights_ok", True) and all(r["ok"] for r in others.values())
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        sys.exit(0 if ok else 1)
    if "image" in selected:
        _echo_image_info(data)
    for modality, r in others.items():
        trained = r["trained"] if r["ok"] else "no: weights missing or not loadable"
        click.echo(f"{modality} ({r['detector']}): {' '.join(f'{k}={v}' for k, v in r['settings'].items())}")
        click.echo(f"  model version: {r['model_version']}  trained: {trained}")
        for part in r["parts"]:
            click.echo(f"  {modality_weights.describe_part(modality, part)}")
            if part["error"]:
                click.echo(f"    {part['error']}")
        if r["error"]:
            click.echo(f"  {r['error']}")
    if not ok:
        sys.exit(1)


def _image_info(settings: Any) -> dict[str, Any]:
    import torch

    from api.detector import weights
    from api.detector.errors import DetectorError
    from api.detector.factory import resolve_device, resolve_precision

    config = DetectorConfig.from_settings(settings)
    data: dict[str, Any] = {
        "settings": {k: v for k, v in settings.public_view().items() if k.startswith("D3_")},
        "cache_dir": str(config.resolved_cache_dir),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        device = resolve_device(config.device)
        data["device"], data["precision"] = str(device), resolve_precision(config.precision, device)
    except DetectorError as exc:
        data["device"], data["precision"], data["device_error"] = None, None, str(exc)
    report = weights.verify_weights(config)
    data["weights"] = report
    data["model_version"] = weights.version_string(
        config.backbone, report["backbone"]["identity"] or "missing", report["head"]["identity"] or "missing",
        config.shuffle_seed, data["precision"] or config.precision)
    data["weights_ok"] = _all_loadable(report)
    # Trained only when both parts are real checkpoints that load: missing files are not a model.
    data["trained"] = data["weights_ok"] and all(entry.get("kind") != "random" for entry in report.values())
    data["missing"] = [part for part, entry in report.items() if not entry.get("present")]
    return data


def _echo_image_info(data: dict[str, Any]) -> None:
    report = data["weights"]
    for key, value in data["settings"].items():
        click.echo(f"{key}={value}")
    click.echo(f"cache dir: {data['cache_dir']}")
    click.echo(f"torch {data['torch']}, CUDA available: {data['cuda_available']}")
    click.echo(f"device: {data['device']}  precision: {data['precision']}" +
               (f"  ({data['device_error']})" if "device_error" in data else ""))
    trained = data["trained"] if data["weights_ok"] else (
        f"no: weights missing ({', '.join(data['missing'])})" if data["missing"] else "no: weights not loadable")
    click.echo(f"model version: {data['model_version']}  trained: {trained}")
    for part, entry in report.items():
        state = "loadable" if entry.get("loadable") else ("present, NOT loadable" if entry.get("present")
                                                           else "MISSING")
        click.echo(f"{part} weights: {state}  {entry.get('path') or entry.get('value') or ''}")
        if entry.get("error"):
            click.echo(f"  {entry['error']}")


def register(cli: click.Group) -> None:
    """Attach the model commands to the `d3` group."""
    for command in (predict, eval_command, fetch_weights, info):
        cli.add_command(command)
