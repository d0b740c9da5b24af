"""The speech and text detectors in the inference tier: one Triton model each, beside D³'s.

`d3 serve-inference` loads them with the registry's own in-process loaders, from the same
AASIST_* / TEXT_* settings as an API that runs them in-process, so the tier computes exactly what
the API would. A modality whose weights are missing (or fail to load) is not served, and the
command says why; the others are. The tensors and the identity parameters are remote_detectors.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.detector.interface import Detector, InputTooLong, InputTooShort
from api.detector.remote_detectors import (
    AUDIO_MODEL,
    TEXT_MODEL,
    RemoteAasist,
    RemoteFastDetectGPT,
    encode_text_result,
    identity_parameters,
)

log = logging.getLogger(__name__)
_WARM_UP_TEXT = "The tier runs one forward pass of each model before it says it is ready. " * 4


@dataclass(frozen=True)
class TierBinding:
    """One detector as a Triton model: its name, batched callable, tensors and identity."""

    modality: str
    model_name: str
    detector: Detector
    infer_func: Callable
    inputs: list[Any]  # pytriton Tensors
    outputs: list[Any]

    @property
    def parameters(self) -> dict[str, str]:
        return identity_parameters(self.detector)


def text_results(detector: Any, texts: list[str]) -> list[bytes]:
    """Each text's encoded result; a refused text (too short or long) is refused alone."""
    results: list[bytes | None] = [None] * len(texts)
    scored: list[int] = []
    for number, text in enumerate(texts):
        try:
            detector.tokenize(text)
            scored.append(number)
        except (InputTooShort, InputTooLong) as exc:
            results[number] = encode_text_result(error=exc)
    for number, score in zip(scored, detector.predict([texts[n] for n in scored]) if scored else [], strict=True):
        results[number] = encode_text_result(score)
    return [r for r in results if r is not None]


def aasist_binding(detector: Any) -> TierBinding:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import Tensor

    from api.detector.aasist import WINDOW_SAMPLES

    @batch
    def infer(waveforms: np.ndarray) -> dict[str, np.ndarray]:
        return {RemoteAasist.output_name: detector.logits(list(waveforms)).numpy().astype(np.float32)}

    detector.logits([np.zeros(WINDOW_SAMPLES, dtype=np.float32)])  # warm-up
    return TierBinding("audio", AUDIO_MODEL, detector, infer,
                       [Tensor(name=RemoteAasist.input_name, dtype=np.float32, shape=(WINDOW_SAMPLES,))],
                       [Tensor(name=RemoteAasist.output_name, dtype=np.float32, shape=(2,))])


def text_binding(detector: Any) -> TierBinding:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import Tensor

    @batch
    def infer(texts: np.ndarray) -> dict[str, np.ndarray]:
        decoded = [bytes(item).decode("utf-8", errors="replace") for item in texts.reshape(-1)]
        results = text_results(detector, decoded)
        return {RemoteFastDetectGPT.output_name: np.array(results, dtype=np.object_).reshape(-1, 1)}

    text_results(detector, [_WARM_UP_TEXT])  # warm-up (a refusal under strict length settings is fine)
    return TierBinding("text", TEXT_MODEL, detector, infer,
                       [Tensor(name=RemoteFastDetectGPT.input_name, dtype=np.bytes_, shape=(1,))],
                       [Tensor(name=RemoteFastDetectGPT.output_name, dtype=np.bytes_, shape=(1,))])


BINDERS: dict[str, Callable[[Any], TierBinding]] = {"audio": aasist_binding, "text": text_binding}


def load_bindings(settings: Any) -> tuple[list[TierBinding], dict[str, str]]:
    """(the detectors this tier serves, why each other modality is not served), loaded in order."""
    from api.detector.registry import DetectorRegistry

    registry = DetectorRegistry.in_process(settings)
    registry.start(background=False)
    bindings: list[TierBinding] = []
    skipped: dict[str, str] = {}
    for modality, slot in registry.slots.items():
        if slot.detector is None:
            skipped[modality] = slot.error or "not loaded"
            continue
        try:
            bindings.append(BINDERS[modality](slot.detector))
        except Exception as exc:  # the warm-up failed: serve the others, say why
            skipped[modality] = f"warm-up failed: {type(exc).__name__}: {exc}"
    return bindings, skipped
