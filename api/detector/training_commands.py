"""`d3 features`, `d3 train`, `d3 calibrate`: adapt the head to your own data and choose its threshold.

The frozen backbone runs in this process, or on the inference tier when D3_INFERENCE_URL (or
--inference-url) names one: the tier's `d3_features` model (remote_features.py), the same tower
the tier scores with. Either way the features file is the same (features, meta, hashes).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from api.detector.commands import F, _config, _load_model, _settings, list_labelled_images, model_options


def tier_options(fn: F) -> F:
    """--inference-url / --inference-timeout, as d3_* keyword arguments (read with the model settings)."""
    fn = click.option("--inference-timeout", "d3_inference_timeout_s", type=click.FloatRange(min=0.1), default=None,
                      help="seconds one batch may take on the tier [D3_INFERENCE_TIMEOUT_S]")(fn)
    return click.option("--inference-url", "d3_inference_url", default=None, metavar="URL",
                        help="run the backbone on this inference tier, grpc://HOST:8001 or http://HOST:8000 "
                             "('' = in this process) [D3_INFERENCE_URL]")(fn)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


def _progress_bar(total: int, label: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=label, file=sys.stderr, disable=not enabled)


def _backbone(options: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
    """(a FeatureSource, its identity or None to read it from the model): the tier's, or loaded here."""
    settings = _settings(options)
    if not settings.d3_inference_url:
        return _load_model(_config(options)), None
    from api.detector.remote_features import RemoteFeatures

    remote = RemoteFeatures(settings.d3_inference_url, settings.d3_inference_timeout_s)
    click.get_current_context().call_on_close(remote.stop)
    try:
        identity = remote.open()
    except Exception as exc:  # unreachable, hung, or not serving d3_features: all end the command here
        raise click.ClickException(f"cannot compute features on the inference tier: {exc}") from None
    click.echo(f"features from the inference tier {settings.d3_inference_url}: "
               + ", ".join(f"{k} {v}" for k, v in identity.items()), err=True)
    return remote, identity


def _features_of(source: Path, options: dict[str, Any], *, augment: bool, copies: int, seed: int,
                 progress: bool, out: Path | None = None, backbone: tuple[Any, dict | None] | None = None) -> Any:
    """A FeatureSet from a features file, or from a real/ + fake/ folder through the frozen backbone."""
    from api.detector.errors import DetectorError
    from api.detector.training import Augmentation, FeatureSet, TrainingError, extract_features
    from api.exceptions import Unavailable

    model = None
    try:
        if source.is_file():
            return FeatureSet.load(source)
        items = list_labelled_images(source)
        if not items:
            raise click.UsageError(f"no images found under {source}/real or {source}/fake")
        model, identity = backbone or _backbone(options)
        with _progress_bar(len(items) * copies, source.name, progress) as bar:
            return extract_features(model, items, augmentation=Augmentation(enabled=augment), copies=copies,
                                    seed=seed, batch_size=_config(options).max_batch_size, out=out,
                                    progress=bar.update, identity=identity)
    except TrainingError as exc:
        raise _fail(exc) from None
    except (DetectorError, Unavailable) as exc:  # the tier failed mid-run: down, hung, overloaded
        cause = getattr(model, "load_error", None) or ""
        kept = f"; the rows computed so far are in {out}: run the command again to resume" \
            if out is not None and out.exists() else ""
        raise click.ClickException(f"{exc}{f' ({cause})' if cause and cause not in str(exc) else ''}{kept}") \
            from None


@click.command("features")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="features file to write (resumed when it exists)")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="the authors' training augmentations: blur sigma 0-3 and JPEG 30-100, each with p=0.5")
@click.option("--copies", type=click.IntRange(1, 64), default=1, show_default=True,
              help="feature rows per image (each with its own seeded augmentation)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@model_options
@tier_options
def features_command(directory: Path, out: Path, augment: bool, copies: int, seed: int, progress: bool,
                     **options: Any) -> None:
    """Run the frozen backbone once over DIRECTORY/real and DIRECTORY/fake and store two-view features."""
    data = _features_of(directory, options, augment=augment, copies=copies, seed=seed, progress=progress, out=out)
    counts = data.counts()
    click.echo(f"{out}: {counts['rows']} rows from {counts['files']} files ({counts['real']} real, "
               f"{counts['fake']} fake), features {tuple(data.features.shape[1:])} float16")


def _start_state(start: str, options: dict[str, Any]) -> tuple[dict | None, str]:
    """The head to start from: the configured (released) one, or none (scratch)."""
    if start == "scratch":
        return None, "scratch"
    from api.detector.errors import DetectorError
    from api.detector.weights import head_state, read_checkpoint, resolve_head

    ref = resolve_head(_config(options))
    if ref.kind == "random":
        return None, f"random:{ref.seed}"
    if not ref.present or ref.path is None:
        raise ref.missing_error()
    try:
        return head_state(read_checkpoint(ref.path, "head"), ref.path), ref.identity()
    except DetectorError as exc:
        raise _fail(exc) from None


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f} %"


@click.command("train")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="head checkpoint to write (the authors' plain state_dict); the card goes beside it")
@click.option("--val", "val", type=click.Path(exists=True, path_type=Path), default=None,
              help="validation folder or features file (default: a seeded 20 % of DATA's files)")
@click.option("--epochs", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--patience", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="stop after this many epochs without a better validation accuracy")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--start", type=click.Choice(["released", "scratch"]), default="released", show_default=True,
              help="start from the configured head (D3_HEAD_WEIGHTS / --head-weights) or from scratch")
@click.option("--augment/--no-augment", default=False, show_default=True, help="when DATA is a folder")
@click.option("--copies", type=click.IntRange(1, 64), default=1, show_default=True, help="when DATA is a folder")
@click.option("--progress/--no-progress", default=True, show_default=True)
@model_options
@tier_options
def train_command(data: Path, out: Path, val: Path | None, epochs: int, patience: int, seed: int, start: str,
                  augment: bool, copies: int, progress: bool, **options: Any) -> None:
    """Train the D3 head on DATA (a features file or a real/ + fake/ folder) with the authors' recipe."""
    from api.detector.model import build_head
    from api.detector.training import (
        Recipe,
        TrainingError,
        card_path,
        evaluate,
        make_card,
        save_head,
        split_validation,
        train_head,
        write_card,
    )

    backbone = None if data.is_file() and (val is None or val.is_file()) else _backbone(options)
    train = _features_of(data, options, augment=augment, copies=copies, seed=seed, progress=progress,
                         backbone=backbone)
    if val is None:
        train, validation = split_validation(train, 0.2, seed)
    else:
        validation = _features_of(val, options, augment=False, copies=1, seed=seed, progress=progress,
                                  backbone=backbone)
    if train.meta.get("backbone") != validation.meta.get("backbone"):
        raise click.ClickException("the training and validation features come from different backbones")
    start_state, start_name = _start_state(start, options)
    recipe = Recipe(epochs=epochs, patience=patience)
    dim = int(train.features.shape[-1])
    initial = build_head(dim, seed=seed)
    if start_state is not None:
        initial.load_state_dict(start_state)
    before = evaluate(initial, validation)
    click.echo(f"train: {train.counts()}  validation: {validation.counts()}  start: {start_name}")
    click.echo(f"{'epoch':>5}  {'loss':>9}  {'val AP':>9}  {'val acc':>9}")

    def report(entry: Any) -> None:
        click.echo(f"{entry.epoch:>5}  {entry.loss:>9.5f}  {_fmt(entry.val_ap):>9}  {_fmt(entry.val_accuracy):>9}")

    try:
        head, history, best_epoch = train_head(train, validation, recipe=recipe, seed=seed, start=start_state,
                                               report=report)
    except TrainingError as exc:
        raise _fail(exc) from None
    after = evaluate(head, validation)
    digest = save_head(head, out)
    card = make_card(head_sha256=digest, train=train, val=validation, recipe=recipe, seed=seed, start=start_name,
                     history=history, best_epoch=best_epoch, before=before, after=after)
    write_card(card_path(out), card)
    click.echo(f"\n{'validation':<12}{'AP':>10}{'accuracy':>12}\n"
               f"{'start':<12}{_fmt(before['ap']):>10}{_fmt(before['accuracy']):>12}\n"
               f"{'trained':<12}{_fmt(after['ap']):>10}{_fmt(after['accuracy']):>12}\n"
               f"best epoch {best_epoch} of {len(history)}; wrote {out} (sha256 {digest[:12]}) and {card_path(out)}")


@click.command("calibrate")
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--target", type=click.Choice(["accuracy", "fpr", "eer"]), default="accuracy", show_default=True,
              help="best accuracy, a false-positive rate on real images (--max-fpr), or the equal error rate")
@click.option("--max-fpr", type=click.FloatRange(0, 1), default=None, help="with --target fpr, e.g. 0.01")
@click.option("--card", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="model card to record the threshold in (default: the head's card, when it has one)")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write ROC and precision-recall curves to this PNG")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.option("--progress/--no-progress", default=True, show_default=True)
@model_options
@tier_options
def calibrate_command(data: Path, target: str, max_fpr: float | None, card: Path | None, plot: Path | None,
                      as_json: bool, progress: bool, **options: Any) -> None:
    """Choose a threshold from reference DATA (a features file or a real/ + fake/ folder)."""
    from api.detector.calibration import calibration_report, curve_table, plot_curves
    from api.detector.model import build_head
    from api.detector.training import card_path, head_scores, read_card, write_card

    if target == "fpr" and max_fpr is None:
        raise click.UsageError("--target fpr needs --max-fpr (e.g. 0.01)")
    config = _config(options)
    reference = _features_of(data, options, augment=False, copies=1, seed=0, progress=progress)
    state, head_name = _start_state("released", options)
    head = build_head(int(reference.features.shape[-1]))
    if state is not None:
        head.load_state_dict(state)
    labels, scores = reference.labels.tolist(), head_scores(head, reference.features)
    try:
        result = calibration_report(labels, scores, target, max_fpr)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result["head"] = head_name
    result["curve"] = [point.__dict__ for point in curve_table(labels, scores)]
    if plot is not None:
        plot_curves(labels, scores, result["threshold"], plot)
    if card is None and config.head_weights and Path(config.head_weights).is_file():
        default_card = card_path(Path(config.head_weights))
        card = default_card if default_card.is_file() else None
    if card is not None:
        document = read_card(card) if card.is_file() else None
        if document is None:
            raise click.ClickException(f"no model card at {card}")
        document["threshold"] = result["threshold"]
        document["calibration"] = {k: result[k] for k in ("target", "max_fpr", "threshold", "at_threshold", "ap",
                                                          "roc_auc", "images")}
        write_card(card, document)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=lambda v: None))
        return
    click.echo(f"{'threshold':>9}  {'TPR':>8}  {'FPR':>8}  {'precision':>9}  {'accuracy':>9}")
    for point in result["curve"]:
        click.echo(f"{point['threshold']:>9.2f}  {_fmt(point['tpr']):>8}  {_fmt(point['fpr']):>8}  "
                   f"{_fmt(point['precision']):>9}  {_fmt(point['accuracy']):>9}")
    chosen = result["at_threshold"]
    click.echo(f"\n{result['images']} images ({result['real']} real, {result['fake']} fake); AP {_fmt(result['ap'])}, "
               f"ROC AUC {result['roc_auc']:.4f}\ntarget {target}: threshold {result['threshold']:.6g} "
               f"(TPR {_fmt(chosen['tpr'])}, FPR {_fmt(chosen['fpr'])}, accuracy {_fmt(chosen['accuracy'])})"
               + (f"\nrecorded in {card}" if card else "") + (f"\ncurves: {plot}" if plot else ""))


def register(cli: click.Group) -> None:
    for command in (features_command, train_command, calibrate_command):
        cli.add_command(command)
