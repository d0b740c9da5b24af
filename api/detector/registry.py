"""The speech and text detectors of one process, built from the settings, each loading on its own.

Each modality loads in its own background thread (a 6-billion-parameter LM takes a while), so the
service starts at once and /health tells which modality is ready. A modality whose weights are
missing, or fail to load, stays unavailable with the reason (naming the missing file or model)
while the others serve. Images and video keep their own engine (api/detector/engine.py).

With D3_INFERENCE_URL set, every modality is the inference tier's (`d3 serve-inference`, one Triton
model per detector): the slots then hold remote detectors (remote_detectors.py), which load nothing
here and are ready while the tier serves their model. Services and routes cannot tell the two apart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api.detector.errors import DetectorError
from api.detector.interface import Detector, DetectorUnavailable, missing_weights
from api.detector.weights import WeightsRef

log = logging.getLogger(__name__)


@dataclass
class DetectorSlot:
    """One modality: how to find its weights, how to load it, and what happened."""

    modality: str
    resolve: Callable[[], tuple[WeightsRef, ...]]  # cheap: finds files, reads nothing
    load: Callable[[], Detector]
    detector: Detector | None = None
    error: str | None = None
    missing: str | None = None
    settled: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def run(self) -> None:
        try:
            absent = missing_weights([ref for ref in self.resolve() if ref.kind != "url"])
            if absent is not None:
                self.missing = str(absent.path) if absent.path is not None and absent.kind != "hub" else absent.spec
                raise absent.missing_error()
            self.detector = self.load()
            log.info("%s detector ready: %s", self.modality, self.detector.model_version)
            if self.detector.ready and not self.detector.trained:
                log.warning("THE %s DETECTOR HAS RANDOM (UNTRAINED) WEIGHTS: its verdicts mean nothing",
                            self.modality.upper())
        except Exception as exc:  # the other modalities keep serving; describe() says why
            self.error = str(exc) if isinstance(exc, DetectorError) else f"{type(exc).__name__}: {exc}"
            log.error("%s detector unavailable: %s", self.modality, self.error)
        finally:
            self.settled.set()

    @property
    def status(self) -> str:
        if self.detector is not None:
            return "ready" if self.detector.ready else "unavailable"  # a remote one: while the tier serves it
        return "unavailable" if self.settled.is_set() else "loading"

    def describe(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "ready": self.status == "ready"}
        if self.detector is not None:
            body.update(self.detector.describe())
        else:
            body.update({"error": self.error, "missing": self.missing})
        return body


class DetectorRegistry:
    def __init__(self, slots: list[DetectorSlot]) -> None:
        self.slots = {slot.modality: slot for slot in slots}
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_settings(cls, settings: Any) -> DetectorRegistry:
        """AASIST for audio, Fast-DetectGPT for text: in the inference tier when D3_INFERENCE_URL is set,
        else in this process, configured by their settings."""
        return cls.remote(settings) if getattr(settings, "d3_inference_url", "") else cls.in_process(settings)

    @classmethod
    def remote(cls, settings: Any) -> DetectorRegistry:
        """Each detector through the tier at D3_INFERENCE_URL, bounded by D3_INFERENCE_TIMEOUT_S."""
        from api.detector.remote_detectors import REMOTE_DETECTORS

        def connect(kind: type) -> Callable[[], Detector]:
            def load() -> Detector:
                detector = kind(settings.d3_inference_url, settings.d3_inference_timeout_s)
                detector.start()
                detector.wait_ready(settings.d3_inference_timeout_s)  # down: unavailable until it comes back
                return detector
            return load

        return cls([DetectorSlot(modality, tuple, connect(kind)) for modality, kind in REMOTE_DETECTORS.items()])

    @classmethod
    def in_process(cls, settings: Any) -> DetectorRegistry:
        """Each detector loaded here (the API without a tier, and the tier itself)."""
        from api.detector import aasist, fast_detectgpt

        audio = aasist.AasistConfig.from_settings(settings)
        text = fast_detectgpt.TextDetectorConfig.from_settings(settings)
        cache = text.resolved_cache_dir
        return cls([
            DetectorSlot("audio", lambda: (aasist.resolve_weights(audio),), lambda: aasist.load_detector(audio)),
            DetectorSlot("text", lambda: (fast_detectgpt.resolve_lm(text.scoring_model, "TEXT_SCORING_MODEL", cache),
                                          fast_detectgpt.resolve_lm(text.sampling_model, "TEXT_SAMPLING_MODEL", cache)),
                         lambda: fast_detectgpt.load_detector(text)),
        ])

    def start(self, background: bool = True) -> None:
        """Load every modality: each in its own daemon thread, or here, one after the other."""
        for slot in self.slots.values():
            if slot.started:
                continue
            slot.started = True
            if background:
                thread = threading.Thread(target=slot.run, name=f"load-{slot.modality}", daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                slot.run()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every modality has loaded or failed; True when all settled in time."""
        return all(slot.settled.wait(timeout) for slot in self.slots.values())

    def get(self, modality: str) -> Detector:
        """The ready detector, or DetectorUnavailable saying why (loading, missing file, load error)."""
        slot = self.slots.get(modality)
        if slot is None:
            raise DetectorUnavailable(modality, f"no {modality} detector is configured")
        if slot.detector is not None:
            return slot.detector
        if not slot.settled.is_set():
            raise DetectorUnavailable(modality, f"the {modality} detector is still loading", loading=True)
        raise DetectorUnavailable(modality, f"the {modality} detector is unavailable: {slot.error}",
                                  missing=slot.missing)

    def describe(self) -> dict[str, dict[str, Any]]:
        return {modality: slot.describe() for modality, slot in self.slots.items()}

    def stop(self) -> None:
        """Stop what the detectors run in the background (a remote one's tier monitor)."""
        for slot in self.slots.values():
            if slot.detector is not None:
                slot.detector.stop()
