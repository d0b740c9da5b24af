"""The speech and text detectors served by the inference tier: the `Detector` interface over Triton.

With D3_INFERENCE_URL set, the API's registry (registry.py) holds these instead of loading AASIST
and the two language models itself; `d3 serve-inference` binds each detector as one Triton model
(tier_detectors.py), loaded from the same AASIST_* / TEXT_* settings. The connection, the
deadlines, the failure mapping (overload, hung, down: each a 503 with Retry-After) and the
monitor that re-reads the model's identity are RemoteEngine's, inherited, so every modality
behaves the same through the tier. What travels (the wire format, shared with the tier side):

- audio, model `aasist`: `waveforms` FP32 (N x 64,600), each window already fixed to one window
  with the authors' pad here -> `logits` FP32 (N x 2); the Score is made here from the logits by
  the same function as in-process, so the scores are the in-process ones.
- text, model `fast_detectgpt`: `texts` BYTES (N x 1, UTF-8) -> `results` BYTES (N x 1), one JSON
  object per text: {score, fake_probability, detail} or {error: too_short | too_long ...}. The text
  goes as text and is tokenised in the tier, so the API needs no tokenizer (nor the models' files);
  the tier's TEXT_MIN_TOKENS / TEXT_MAX_TOKENS / TEXT_MAX_CHARS apply, and a refusal comes back
  per text (a dynamic batch mixes requests of several API workers: one short text must not fail
  the others).

The identity of each model (model version, trained, its describe()) is published as parameters of
its Triton config, as the D³ model's is, and shown in /health.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from api.detector.aasist import fix_length, scores_from_logits
from api.detector.interface import Detector, InputTooLong, InputTooShort, Score
from api.detector.remote_engine import RemoteConfig, RemoteEngine

log = logging.getLogger(__name__)

AUDIO_MODEL = "aasist"
TEXT_MODEL = "fast_detectgpt"
# Keys of the Triton config `parameters` that carry a detector's identity (strings, as Triton has them).
VERSION_KEY, TRAINED_KEY, INFO_KEY = "detector_model_version", "detector_trained", "detector_info"


def identity_parameters(detector: Detector) -> dict[str, str]:
    """What the tier publishes of a loaded detector (read back by DetectorTierModel)."""
    return {VERSION_KEY: detector.model_version, TRAINED_KEY: "true" if detector.trained else "false",
            INFO_KEY: json.dumps(detector.describe())}


@dataclass(frozen=True)
class DetectorTierModel:
    """A detector model as the tier's config describes it."""

    max_batch_size: int
    model_version: str
    trained: bool
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", ""))

    @property
    def device(self) -> str:
        return str(self.info.get("device", ""))

    @classmethod
    def from_config(cls, config: dict[str, Any], model_name: str) -> DetectorTierModel:
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        try:
            info = json.loads(params.get(INFO_KEY) or "{}")
        except ValueError:
            info = {}
        version = params.get(VERSION_KEY, "")
        if not version:  # not served by `d3 serve-inference`: never call it trained
            log.warning("the tier's model %r publishes no %s parameter; treating it as untrained", model_name,
                        VERSION_KEY)
        return cls(max_batch_size=int(config.get("max_batch_size") or 1),
                   model_version=version or f"triton/{model_name}/unknown",
                   trained=params.get(TRAINED_KEY) == "true", info=info if isinstance(info, dict) else {})


class RemoteDetector(RemoteEngine, Detector):
    """A detector whose model runs in the tier; predict sends one request per call (split only
    where the tier's max_batch_size is smaller than the call)."""

    modality: ClassVar[str]
    name: ClassVar[str]
    model_name: ClassVar[str]
    input_name: ClassVar[str]
    input_dtype: ClassVar[str]
    output_name: ClassVar[str]

    def __init__(self, url: str, timeout_s: float, poll_interval_s: float = 2.0) -> None:
        super().__init__(RemoteConfig(url, model_name=self.model_name, timeout_s=timeout_s,
                                      poll_interval_s=poll_interval_s))
        self.weights = ()  # this process holds no weights: the tier's `d3 info` reports them

    def _read_model(self, config: dict[str, Any]) -> DetectorTierModel:
        return DetectorTierModel.from_config(config, self.config.model_name)

    def encode(self, inputs: Sequence[Any]) -> Any:
        """The inputs as one batch-first array of the model's input tensor."""
        raise NotImplementedError

    def decode(self, output: Any) -> list[Score]:
        raise NotImplementedError

    def predict(self, inputs: Sequence[Any], timeout: float | None = None) -> list[Score]:
        if not len(inputs):
            return []
        batch = self.encode(inputs)
        return self._bounded(len(batch), timeout, lambda deadline, bound: self._scores(batch, deadline, bound))

    def _scores(self, batch: Any, deadline: float, bound: float) -> list[Score]:
        model = self._connected_model(deadline, bound)
        scores: list[Score] = []
        for start in range(0, len(batch), model.max_batch_size):
            part = batch[start:start + model.max_batch_size]
            response = self._send([(self.input_name, part, self.input_dtype)], [self.output_name], deadline, bound)
            scores.extend(self.decode(response.as_numpy(self.output_name)))
        return scores

    def describe(self) -> dict[str, Any]:
        model = self.tier_model
        body = dict(model.info) if model is not None else {}
        body.update({"modality": self.modality, "name": self.name, "model_version": self.model_version,
                     "trained": self.trained,
                     "inference_tier": {"url": self.config.url, "model": self.config.model_name,
                                        "ready": self.ready, "error": self.load_error}})
        return body


class RemoteAasist(RemoteDetector):
    modality, name, model_name = "audio", "aasist", AUDIO_MODEL
    input_name, input_dtype, output_name = "waveforms", "FP32", "logits"

    def encode(self, inputs: Sequence[Any]) -> Any:
        return np.stack([fix_length(np.asarray(w, dtype=np.float32)) for w in inputs])

    def decode(self, output: Any) -> list[Score]:
        return scores_from_logits(output.reshape(-1, 2).tolist())


class RemoteFastDetectGPT(RemoteDetector):
    modality, name, model_name = "text", "fast-detectgpt", TEXT_MODEL
    input_name, input_dtype, output_name = "texts", "BYTES", "results"

    def encode(self, inputs: Sequence[str]) -> Any:
        return np.array([[text.encode("utf-8")] for text in inputs], dtype=np.object_)

    def decode(self, output: Any) -> list[Score]:
        return [decode_text_result(json.loads(item)) for item in output.reshape(-1)]


# ---------------------------------------------------------------- the text wire format
def encode_text_result(score: Score | None = None, error: Exception | None = None) -> bytes:
    """The tier's answer for one text: its Score, or why it was refused (as InputTooShort/Long say)."""
    if isinstance(error, InputTooShort):
        body: dict[str, Any] = {"error": {"kind": "too_short", "message": error.message, "minimum": error.minimum,
                                          "got": error.got}}
    elif isinstance(error, InputTooLong):
        body = {"error": {"kind": "too_long", "message": error.message, "limit": error.limit, "got": error.got,
                          "unit": error.unit}}
    else:
        assert score is not None
        body = {"score": score.score, "fake_probability": score.fake_probability, "detail": score.detail}
    return json.dumps(body).encode("utf-8")


def decode_text_result(body: dict[str, Any]) -> Score:
    """The Score of one text, or the same refusal the in-process detector raises."""
    error = body.get("error")
    if error is None:
        return Score(score=float(body["score"]), fake_probability=float(body["fake_probability"]),
                     detail=body.get("detail"))
    if error.get("kind") == "too_short":
        raise InputTooShort(error["message"], minimum=int(error["minimum"]), got=int(error["got"]))
    raise InputTooLong(error["message"], limit=int(error["limit"]), got=int(error["got"]), unit=str(error["unit"]))


REMOTE_DETECTORS: dict[str, type[RemoteDetector]] = {"audio": RemoteAasist, "text": RemoteFastDetectGPT}
