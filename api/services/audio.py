"""Speech predictions: decode in a child process, cut into AASIST windows, score, aggregate, store.

The flow of POST /predict/audio (and of a video's soundtrack with audio=true):
1. the upload is spooled to a temporary file with a byte counter and hash (the video code's);
2. the format is recognised from the first bytes, then a child process decodes the first audio
   track to 16 kHz mono float32 (api/utils/audio_decode.py: time and memory limits, duration limit);
3. the recording is cut into 64,600-sample windows every AUDIO_HOP_SECONDS (one window, the
   authors' pad, when it is shorter), each scored by AASIST;
4. the windows are treated like a video's sampled frames, with the video code's functions:
   mean/vote/max aggregates, fake segments (runs of consecutive windows over the threshold) and
   the timeline picture; one `predictions` row (media_type audio) with a `video_predictions` row
   as its time-series detail (windows analysed, aggregates, segments, job state), the per-window
   JSON, the summary JSON and the timeline PNG in the store, and the input file only when KEEP_AUDIO.
Long recordings, or async=true, become a job run by the same job pool as videos (api/tasks.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any

from api.database import Database
from api.detector.aasist import SAMPLE_RATE, WINDOW_SAMPLES, window_starts
from api.detector.interface import Detector
from api.detector.registry import DetectorRegistry
from api.exceptions import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnprocessableMedia,
)
from api.models import Prediction, VideoPrediction
from api.services import series
from api.services.jobs import JobStore
from api.services.predictions import model_failures, serialize_prediction, verdict
from api.services.records import insert_with_objects
from api.services.timeline import render_timeline
from api.services.videos import (
    AGGREGATIONS,
    SpooledUpload,
    aggregate,
    find_segments,
    spool_upload,
    top_frames,
)
from api.storage import ObjectStore, object_key
from api.utils.audio_decode import AudioDecodeError, DecodedAudio, decode_audio, sniff_audio

log = logging.getLogger(__name__)

SCORING_CHUNK = 8  # windows per detector call in a job (progress is reported between calls)
SUFFIX = {"wav": ".wav", "flac": ".flac", "ogg": ".ogg", "mp3": ".mp3", "aac": ".aac", "m4a": ".m4a"}


@dataclass(frozen=True)
class AudioParams:
    threshold: float
    aggregation: str = "mean"
    run_async: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation, "async": self.run_async}


@dataclass
class AudioAnalysis:
    audio: dict  # decoding facts (container, codec, channels, rates, duration)
    windows: list[dict]  # index, start_s, end_s, timestamp_s, score, fake_probability, position
    hop_s: float
    model_version: str
    trained: bool
    timings_ms: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return float(self.audio["duration_s"])


# -- pure computations (tested directly) -------------------------------------------------------------
def plan_windows(n_samples: int, hop_s: float) -> list[tuple[int, int]]:
    """(start, end) samples of the scoring windows (see aasist.window_starts)."""
    hop = max(1, round(hop_s * SAMPLE_RATE))
    return [(start, min(start + WINDOW_SAMPLES, n_samples)) for start in window_starts(n_samples, hop)]


def window_segments(windows: list[dict], threshold: float) -> list[dict]:
    """Runs of consecutive windows over the threshold, from the first window's start to the last's end.

    The video code finds the runs (windows are its sampled frames, one slice each); the times are
    then the windows' own, since windows may overlap (hop < window) or the last may be tail-aligned.
    """
    by_index = {w["index"]: w for w in windows}
    runs = find_segments(windows, threshold, duration_s=float(len(windows)), planned=len(windows))
    return [{"start_s": by_index[run["start_frame"]]["start_s"], "end_s": by_index[run["end_frame"]]["end_s"],
             "start_window": run["start_frame"], "end_window": run["end_frame"], "windows": run["frames"],
             "mean_probability": run["mean_probability"], "max_probability": run["max_probability"]}
            for run in runs]


def top_windows(windows: list[dict]) -> list[dict]:
    ranked = top_frames(windows)
    by_index = {w["index"]: w for w in windows}
    return [{"index": r["index"], "start_s": by_index[r["index"]]["start_s"], "end_s": by_index[r["index"]]["end_s"],
             "fake_probability": r["fake_probability"]} for r in ranked]


def result_fields(windows: list[dict], threshold: float, aggregation: str) -> dict[str, Any]:
    aggregates = aggregate([w["fake_probability"] for w in windows], threshold)
    chosen = aggregates[aggregation]
    label, confidence = verdict(chosen, threshold)
    return {"aggregates": aggregates, "fake_probability": chosen, "prediction": label, "confidence": confidence,
            "segments": window_segments(windows, threshold), "top_windows": top_windows(windows)}


def public_windows(windows: list[dict]) -> list[dict]:
    return [{k: w[k] for k in ("index", "start_s", "end_s", "score", "fake_probability")} for w in windows]


# -- the service ----------------------------------------------------------------------------------------
class AudioService:
    def __init__(self, db: Database, store: ObjectStore, detectors: DetectorRegistry, settings: Any,
                 jobs: JobStore | None = None) -> None:
        self.db = db
        self.store = store
        self.detectors = detectors
        self.settings = settings
        self.jobs = jobs  # job rows (api/services/jobs.py), shared with video jobs
        self.queue: Any = None  # the executor (threads or Celery) that runs queued jobs; set by build_services

    # ---------------------------------------------------------------- parameters and upload
    def params(self, threshold: float | None, aggregation: str = "mean", run_async: bool = False) -> AudioParams:
        """A request's parameters, checked; `threshold` None: DEFAULT_THRESHOLD."""
        threshold = self.settings.default_threshold if threshold is None else threshold
        if aggregation not in AGGREGATIONS:
            raise InvalidInput(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}",
                               parameter="aggregation")
        return AudioParams(threshold=threshold, aggregation=aggregation, run_async=run_async)

    def spool(self, stream: IO[bytes], filename: str | None) -> SpooledUpload:
        try:
            return spool_upload(stream, filename, self.settings.max_audio_bytes)
        except PayloadTooLarge:
            raise PayloadTooLarge(f"the audio is larger than the limit of {self.settings.max_audio_bytes} bytes",
                                  reason="too_large") from None

    def detector(self) -> Detector:
        return self.detectors.get("audio")  # DetectorUnavailable: the API's 503, naming a missing file

    # ---------------------------------------------------------------- decoding and scoring
    @staticmethod
    def sniff(path: str) -> str:
        try:
            return sniff_audio(path)
        except AudioDecodeError as exc:
            raise UnprocessableMedia(exc.message, reason=exc.kind) from None

    def decode(self, path: str, container: str) -> DecodedAudio:
        try:
            return decode_audio(path, container, timeout_s=self.settings.video_decode_timeout_s,
                                memory_mb=self.settings.video_decode_memory_mb,
                                max_seconds=self.settings.max_audio_seconds)
        except AudioDecodeError as exc:
            if exc.kind == "too_long":
                raise PayloadTooLarge(exc.message, reason="too_long") from None
            raise UnprocessableMedia(exc.message, reason=exc.kind) from None

    def analyze(self, decoded: DecodedAudio, progress: Callable[[int, int], None] | None = None) -> AudioAnalysis:
        detector = self.detector()
        samples = decoded.samples
        spans = plan_windows(samples.shape[0], self.settings.audio_hop_seconds)
        windows: list[dict] = []
        started = time.perf_counter()
        # A request's windows go to the detector in one call (so one request to an inference tier); a
        # job's in chunks, so that its progress moves between them.
        chunk = SCORING_CHUNK if progress is not None else max(len(spans), 1)
        for first in range(0, len(spans), chunk):
            group = spans[first:first + chunk]
            try:
                with model_failures():  # the inference tier's overload, timeout, outage: their own 503s
                    scores = detector.predict([samples[start:end] for start, end in group])
            except Unavailable:
                raise
            except Exception as exc:  # the forward pass failed (out of memory, ...): the model, not the file
                log.exception("AASIST failed on %d windows", len(group))
                raise Unavailable("the audio detector failed on this request; retry shortly") from exc
            for offset, ((start, end), score) in enumerate(zip(group, scores, strict=True)):
                position = first + offset
                windows.append({"index": position, "position": position, "start_s": round(start / SAMPLE_RATE, 6),
                                "end_s": round(end / SAMPLE_RATE, 6), "timestamp_s": round(start / SAMPLE_RATE, 6),
                                "score": score.score, "fake_probability": score.fake_probability})
            if progress is not None:
                progress(len(windows), len(spans))
        timings = {"decode_ms": round(decoded.decode_s * 1000, 3),
                   "inference_ms": round((time.perf_counter() - started) * 1000, 3)}
        return AudioAnalysis(audio=decoded.describe(), windows=windows, hop_s=self.settings.audio_hop_seconds,
                             model_version=detector.model_version, trained=detector.trained, timings_ms=timings)

    # ---------------------------------------------------------------- submit (request thread)
    def submit(self, upload: SpooledUpload, params: AudioParams, owner: str | None,
               base_url: str | None = None, container: str | None = None) -> series.Submission:
        """Analyse now (the result) or queue a job (the job). The caller removes the upload."""
        started = time.perf_counter()
        container = container or self.sniff(upload.path)
        detector = self.detector()  # 503 before any decoding when the model cannot serve
        if params.run_async:
            row = self._create_job(upload, params, owner, base_url, container, detector.model_version)
            return series.Submission(self.public_body(row, None), queued=True)
        decoded = self.decode(upload.path, container)
        if decoded.duration_s > self.settings.audio_async_seconds:
            row = self._create_job(upload, params, owner, base_url, container, detector.model_version)
            return series.Submission(self.public_body(row, None), queued=True)
        analysis = self.analyze(decoded)
        row = self._store_result(upload, analysis, params, owner, container,
                                 (time.perf_counter() - started) * 1000.0)
        body = self.public_body(row, analysis.windows)
        body["timings_ms"] = analysis.timings_ms
        return series.Submission(body, queued=False)

    # ---------------------------------------------------------------- storing
    def _fill(self, row: Prediction, analysis: AudioAnalysis, params: AudioParams, elapsed_ms: float) -> None:
        fields = result_fields(analysis.windows, params.threshold, params.aggregation)
        detail = row.video
        row.prediction, row.confidence = fields["prediction"], fields["confidence"]
        row.fake_probability = fields["fake_probability"]
        row.model_version = analysis.model_version
        row.processing_ms = round(elapsed_ms, 3)
        row.result_object = row.result_object or object_key(str(row.id), ".json", row.created_at)
        detail.duration_s = analysis.duration_s
        detail.codec = str(analysis.audio.get("codec", ""))[:32]
        detail.frames_analyzed = len(analysis.windows)
        detail.mean_probability = fields["aggregates"]["mean"]
        detail.vote_share = fields["aggregates"]["vote"]
        detail.max_probability = fields["aggregates"]["max"]
        detail.segments, detail.top_frames = fields["segments"], fields["top_windows"]
        detail.frames_object = detail.frames_object or object_key(str(row.id), ".windows.json", row.created_at)
        detail.progress_done = detail.progress_total = len(analysis.windows)
        detail.params = {**(detail.params or {}), "audio": analysis.audio, "hop_s": analysis.hop_s,
                         "window_samples": WINDOW_SAMPLES, "timings_ms": analysis.timings_ms}

    def _documents(self, row: Prediction, analysis: AudioAnalysis) -> list[tuple[str, str, bytes, str]]:
        windows_doc = {"id": str(row.id), "threshold": row.threshold, "hop_s": analysis.hop_s,
                       "window_samples": WINDOW_SAMPLES, "sample_rate": SAMPLE_RATE,
                       "windows": public_windows(analysis.windows)}
        summary = serialize_prediction(row, None, self.settings)
        summary.update(self.audio_fields(row, None, urls=False))
        summary["trained_model"] = analysis.trained
        plotted = [{"timestamp_s": (w["start_s"] + w["end_s"]) / 2, "fake_probability": w["fake_probability"]}
                   for w in analysis.windows]
        png = render_timeline(plotted, row.video.segments or [], analysis.duration_s, row.threshold,
                              title=f"{(row.filename or str(row.id))[:60]}: {row.prediction} "
                                    f"({row.video.aggregation} {row.fake_probability:.3f}) - audio windows")
        return [(self.settings.bucket_frames, row.video.frames_object, json.dumps(windows_doc).encode(),
                 "application/json"),
                (self.settings.bucket_results, row.result_object, json.dumps(summary).encode(), "application/json"),
                (self.settings.bucket_results, series.timeline_key(row), png, "image/png")]

    def _new_row(self, upload: SpooledUpload, params: AudioParams, owner: str | None, container: str,
                 model_version: str) -> Prediction:
        now = datetime.now(timezone.utc)
        row = Prediction(id=uuid.uuid4(), created_at=now, media_type="audio", filename=upload.filename,
                         sha256=upload.sha256, size_bytes=upload.size, threshold=params.threshold,
                         model_version=model_version, owner=owner)
        row.video = VideoPrediction(container=container, aggregation=params.aggregation, params=params.as_dict(),
                                    progress_done=0, progress_total=0)
        return row

    def _input_object(self, row: Prediction, container: str) -> str:
        return object_key(str(row.id), SUFFIX.get(container, ".bin"), row.created_at)

    def _store_result(self, upload: SpooledUpload, analysis: AudioAnalysis, params: AudioParams, owner: str | None,
                      container: str, elapsed_ms: float) -> Prediction:
        """Objects first, then both rows in one transaction; on failure nothing remains."""
        row = self._new_row(upload, params, owner, container, analysis.model_version)
        row.status = "done"
        self._fill(row, analysis, params, elapsed_ms)
        objects = self._documents(row, analysis)
        if self.settings.keep_audio:
            row.media_object = self._input_object(row, container)
            objects.insert(0, (self.settings.bucket_media, row.media_object, upload.path, "application/octet-stream"))
        insert_with_objects(self.db, self.store, row, objects)
        return row

    # ---------------------------------------------------------------- jobs (the video job queue runs them)
    def _create_job(self, upload: SpooledUpload, params: AudioParams, owner: str | None, base_url: str | None,
                    container: str, model_version: str) -> Prediction:
        if self.jobs is None or self.queue is None:
            raise Unavailable("audio jobs are not accepted by this process")
        row = self._new_row(upload, params, owner, container, model_version)
        row.video.params = {**params.as_dict(), "async": True, "base_url": base_url}
        row.video.upload_object = self._input_object(row, container)
        self.jobs.create(row, upload.path)
        try:
            self.queue.submit(row.id)
        except Unavailable:
            self.jobs.discard(row.id)  # nothing half-written: no row, no upload
            raise
        return row

    def job_filler(self, row: Prediction, path: str, progress: Callable[[int, int], None],
                   started: float) -> Callable[[Prediction], list[tuple[str, str, Any, str]]]:
        """For JobStore.complete: analyse the job's downloaded upload, then fill its row and name its objects."""
        params = AudioParams(threshold=row.threshold, aggregation=row.video.aggregation, run_async=True)
        container = self.sniff(path)
        analysis = self.analyze(self.decode(path, container), progress=progress)
        elapsed_ms = (time.perf_counter() - started) * 1000.0

        def fill(job: Prediction) -> list[tuple[str, str, Any, str]]:
            self._fill(job, analysis, params, elapsed_ms)
            objects: list[tuple[str, str, Any, str]] = list(self._documents(job, analysis))
            if self.settings.keep_audio:
                job.media_object = self._input_object(job, container)
                objects.insert(0, (self.settings.bucket_media, job.media_object, path, "application/octet-stream"))
            return objects

        return fill

    # ---------------------------------------------------------------- reading back
    def public_body(self, row: Prediction, windows: list[dict] | None) -> dict[str, Any]:
        body = serialize_prediction(row, self.store, self.settings)
        body.update(self.audio_fields(row, windows))
        return body

    def audio_fields(self, row: Prediction, windows: list[dict] | None, urls: bool = True) -> dict[str, Any]:
        detail = row.video
        if detail is None:
            return {}
        params = detail.params or {}
        body = series.common_fields(row)
        body.update({
            "windows_analyzed": detail.frames_analyzed,
            "audio": params.get("audio"),
            "window": {"samples": WINDOW_SAMPLES, "seconds": WINDOW_SAMPLES / SAMPLE_RATE,
                       "hop_s": params.get("hop_s", self.settings.audio_hop_seconds), "sample_rate": SAMPLE_RATE},
            "score_meaning": "AASIST bona fide logit (higher = more bona fide); fake_probability = sigmoid(-score)",
            "top_windows": detail.top_frames,
        })
        if windows is not None:
            body["windows"] = public_windows(windows)
        if urls:
            body["timeline_url"] = series.timeline_url(self.store, self.settings, row)
        return body

    def timeline_png(self, row: Prediction) -> bytes:
        """The stored timeline picture of a finished audio prediction."""
        png = series.stored_timeline(self.store, self.settings, row)
        if png is None:
            raise NotFound(f"the timeline of prediction {row.id} is no longer stored")
        return png

    def detail(self, row: Prediction) -> dict[str, Any]:
        """GET /predictions/<id> for audio: progress while queued/running, every window once done."""
        body = self.audio_fields(row, None)
        body["windows"] = series.read_items(self.store, self.settings, row, "windows")
        return body
