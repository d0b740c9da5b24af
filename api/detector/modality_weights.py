"""`d3 info` and `d3 fetch-weights` for the speech and text detectors (D³'s own are in weights.py).

- audio: the AASIST checkpoint (AASIST_WEIGHTS): a file, an https URL (fetched once into the
  cache) or, by default, the authors' release of AASIST_MODEL (AUTHORS_WEIGHTS_URL, a plain git
  blob of clovaai/aasist) at <D3_CACHE_DIR>/aasist/<AASIST_MODEL>.pth. `info` reads it the way
  the detector does (weights_only, strict keys and shapes), so "present" means "loads".
- text: the scoring and sampling LMs (TEXT_SCORING_MODEL, TEXT_SAMPLING_MODEL): Hugging Face
  names found in <D3_CACHE_DIR>/huggingface or the user's hub cache, or local folders. `info`
  checks their files are there (config and weights) without loading billions of parameters;
  `fetch-weights` downloads hub models into <D3_CACHE_DIR>/huggingface when online.
Nothing here downloads unless `fetch` is called; offline (HF_HUB_OFFLINE, or no DNS) it says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.detector.weights import WeightsRef

MODALITIES = ("audio", "text")
SETTING_PREFIX = {"audio": "AASIST_", "text": "TEXT_"}
# The sha256 of the authors' checkpoints begins so (clovaai/aasist at a04c986, docs/AASIST.md).
AUTHORS_SHA256_PREFIX = {"AASIST": "51d2d9cf", "AASIST-L": "814331d0"}
_LM_WEIGHT_FILES = ("*.safetensors", "*.bin")


def _part(ref: WeightsRef, state: str, error: str | None = None) -> dict[str, Any]:
    return {"part": ref.part, "setting": ref.setting, "value": ref.spec, "kind": ref.kind,
            "path": str(ref.path) if ref.path is not None else None, "present": ref.present, "state": state,
            "error": error}


def _summary(modality: str, detector: str, parts: list[dict[str, Any]], model_version: str,
             error: str | None = None) -> dict[str, Any]:
    ok = error is None and all(p["state"] in ("present", "random") for p in parts)
    return {"modality": modality, "detector": detector, "ok": ok,
            "trained": ok and all(p["kind"] != "random" for p in parts), "model_version": model_version,
            "parts": parts, "error": error}


# ---------------------------------------------------------------- what is there
def audio_report(settings: Any) -> dict[str, Any]:
    from api.detector import aasist

    config = aasist.AasistConfig.from_settings(settings)
    ref = aasist.resolve_weights(config)
    if not ref.present:
        part = _part(ref, "missing", str(ref.missing_error()))
        return _summary("audio", "aasist", [part], f"aasist/{config.model}/missing/fp32")
    try:  # read and checked as the detector does; a random model is only built
        aasist.build_aasist(config.arch, ref)
        part = _part(ref, "random" if ref.kind == "random" else "present")
    except Exception as exc:  # a diagnostic reports, it does not raise
        part = _part(ref, "not loadable", str(exc))
    return _summary("audio", "aasist", [part], aasist.model_version(config.arch, ref))


def _lm_state(ref: WeightsRef) -> tuple[str, str | None]:
    if ref.kind == "random":
        return "random", None
    if not ref.present:
        return "missing", str(ref.missing_error())
    assert ref.path is not None
    folder = ref.path.parent
    if not any(any(folder.glob(pattern)) for pattern in _LM_WEIGHT_FILES):
        return "not loadable", f"{ref.part} {ref.spec!r}: {folder} has a config.json but no weights file " \
                               f"({', '.join(_LM_WEIGHT_FILES)})"
    return "present", None


def text_report(settings: Any) -> dict[str, Any]:
    import torch

    from api.detector import fast_detectgpt as fd
    from api.detector.errors import DetectorError
    from api.detector.factory import resolve_device

    config = fd.TextDetectorConfig.from_settings(settings)
    cache = config.resolved_cache_dir
    refs = [fd.resolve_lm(config.scoring_model, "TEXT_SCORING_MODEL", cache),
            fd.resolve_lm(config.sampling_model, "TEXT_SAMPLING_MODEL", cache)]
    parts = [_part(ref, *_lm_state(ref)) for ref in refs]
    random = {ref.kind == "random" for ref in refs}
    error = None
    if random == {True, False}:
        error = "TEXT_SCORING_MODEL and TEXT_SAMPLING_MODEL must both be random:<seed> or both real models"
    else:
        try:
            fd.pick_calibration(config, random == {True})
        except DetectorError as exc:
            error = str(exc)
    try:
        device = resolve_device(config.device)
    except DetectorError:  # no CUDA here: the version as a CPU would load it
        device = torch.device("cpu")
    dtype = fd._dtype(config.precision, device)
    return _summary("text", "fast-detectgpt", parts, fd.model_version(refs[1], refs[0], dtype), error)


REPORTS: dict[str, Callable[[Any], dict[str, Any]]] = {"audio": audio_report, "text": text_report}


def report(modality: str, settings: Any) -> dict[str, Any]:
    return REPORTS[modality](settings)


# ---------------------------------------------------------------- fetching
def fetch_audio(settings: Any, echo: Callable[[str], None]) -> list[str]:
    """Download the AASIST checkpoint the settings name (the authors' by default); the problems."""
    from api.detector import aasist
    from api.detector.weights import WeightsError, download_file, file_sha256

    config = aasist.AasistConfig.from_settings(settings)
    ref = aasist.resolve_weights(config)
    if ref.present:
        return []
    url = ref.spec if ref.kind == "url" else "" if ref.spec else aasist.AUTHORS_WEIGHTS_URL.get(config.model, "")
    if not url:  # a file the operator named, or an architecture without a published checkpoint
        return [str(ref.missing_error())]
    assert ref.path is not None
    echo(f"downloading the AASIST checkpoint {url} ...")
    try:
        download_file(url, ref.path, setting="AASIST_WEIGHTS")
    except WeightsError as exc:
        return [str(exc)]
    prefix = AUTHORS_SHA256_PREFIX.get(config.model, "")
    if url == aasist.AUTHORS_WEIGHTS_URL.get(config.model) and not file_sha256(ref.path).startswith(prefix):
        echo(f"warning: {ref.path} is not the authors' release the docs name (sha256 {prefix}...): "
             "their repository may have changed it")
    return []


def fetch_text(settings: Any, echo: Callable[[str], None]) -> list[str]:
    """Download the scoring and sampling LMs into <D3_CACHE_DIR>/huggingface; the problems."""
    from api.detector import fast_detectgpt as fd
    from api.detector.weights import WeightsError

    config = fd.TextDetectorConfig.from_settings(settings)
    cache = config.resolved_cache_dir
    problems = []
    wanted = {config.scoring_model: "TEXT_SCORING_MODEL"}
    wanted.setdefault(config.sampling_model, "TEXT_SAMPLING_MODEL")  # one download when both are one model
    for spec, setting in wanted.items():
        ref = fd.resolve_lm(spec, setting, cache)
        if ref.present:
            continue
        if ref.kind != "hub":  # a local folder that is not there: nothing to download
            problems.append(str(ref.missing_error()))
            continue
        echo(f"downloading {spec} from Hugging Face into {cache / 'huggingface'} (large: this takes a while) ...")
        try:
            fd.download_lm(ref, cache)
        except WeightsError as exc:
            problems.append(str(exc))
    return problems


FETCHERS: dict[str, Callable[[Any, Callable[[str], None]], list[str]]] = {"audio": fetch_audio, "text": fetch_text}


def fetch(modality: str, settings: Any, echo: Callable[[str], None]) -> list[str]:
    return FETCHERS[modality](settings, echo)


def describe_part(modality: str, part: dict[str, Any]) -> str:
    """One line of `d3 info` / `d3 fetch-weights` for one part of a detector's weights."""
    state = {"present": "present", "random": "random (untrained)", "missing": "MISSING",
             "not loadable": "present, NOT loadable"}[part["state"]]
    return f"{modality} {part['part']} ({part['setting']}={part['value'] or 'default'}): {state}  " \
           f"{part['path'] or ''}".rstrip()
