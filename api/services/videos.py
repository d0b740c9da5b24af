"""Video predictions: upload spooling, probing, frame sampling, inference, aggregation, storage, jobs.

The flow of POST /predict/video:
1. the upload is streamed to a temporary file (never held in memory) with a byte counter and hash;
2. the container is recognised from its first bytes, then a child process probes it
   (api/utils/video_probe.py: time and memory limits, a hostile file kills only the child);
3. short videos are analysed at once (sync); long or big ones, or `async=true`, become a job
   (status queued, api/services/jobs.py) that an executor runs: threads in this process, or the
   Celery worker tier (api/tasks.py, api/worker.py);
4. frames sampled uniformly go through exactly the image preprocessing (spec §1) and the shared
   engine in small batches, while the child keeps decoding;
5. aggregates, segments and top frames are computed, and everything is stored all or nothing:
   the video (d3-videos, unless KEEP_VIDEOS=false), the per-frame JSON (d3-frames), the summary
   and the timeline picture (d3-results), then one `predictions` row and one `video_predictions` row.

Sampling (documented in the API): `frames=n` takes min(n, frame_count) frames, the centre frame of
each of n equal slices: index_i = floor((i + 1/2) * frame_count / n). `fps=r` takes
floor(duration * r) frames (at least 1, at most MAX_VIDEO_FRAMES) the same way. A sampled frame
stands for its slice, so a fake segment (a run of consecutive sampled frames over the threshold)
spans from the start of its first frame's slice to the end of its last frame's slice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Protocol
from urllib.parse import urljoin

from PIL import Image

from api.config import Settings
from api.database import Database
from api.detector import preprocess_image
from api.detector.config import IMAGE_SIZE
from api.detector.interface import Engine
from api.detector.versions import CONFIGURED, Head
from api.exceptions import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    TooManyJobs,
    Unavailable,
    UnprocessableMedia,
)
from api.models import Prediction, VideoPrediction
from api.services import series
from api.services.callbacks import check_callback_url
from api.services.jobs import JobStore, pid_alive
from api.services.predictions import (
    pin_head,
    provenance_limits,
    record_provenance,
    resolve_threshold,
    run_engine,
    safe_filename,
    serialize_prediction,
    verdict,
)
from api.services.records import StoredObject, insert_with_objects
from api.services.timeline import render_timeline
from api.storage import ObjectNotFound, ObjectStore, object_key
from api.utils.provenance import read_provenance_of_file
from api.utils.video_probe import ProbeInfo, VideoDecodeError, VideoReader, sample_indices, sniff

log = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "vote", "max")
TOP_FRAMES = 5
INFERENCE_CHUNK = 8  # frames per engine call: inference starts while the child still decodes
MAX_SAMPLE_FPS = 1000.0
COPY_CHUNK = 1024 * 1024
CONTAINER_SUFFIX = {"mp4": ".mp4", "mov": ".mov", "3gp": ".3gp", "avi": ".avi", "webm": ".webm",
                    "matroska": ".mkv", "mpegts": ".ts", "mpeg": ".mpg", "flv": ".flv", "ogg": ".ogv",
                    "asf": ".wmv"}


# -- request parameters -----------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoParams:
    threshold: float
    frames: int | None = None
    fps: float | None = None
    aggregation: str = "mean"
    run_async: bool = False
    callback_url: str | None = None
    # The head every frame is scored by, pinned when the request came in (a job keeps the version's
    # id in its params and pins the same head when it runs). None: the one active at analysis.
    head: Head | None = field(default=None, compare=False)
    version: str | None = None
    pinned: bool = False

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"frames": self.frames, "fps": self.fps, "aggregation": self.aggregation,
                                "async": self.run_async}
        if self.head is not None or self.pinned:
            body["model_version_id"] = self.head.version if self.head is not None else self.version
        return body

    @classmethod
    def from_row(cls, row: Prediction) -> VideoParams:
        stored = row.video.params or {}
        return cls(threshold=row.threshold, frames=stored.get("frames"), fps=stored.get("fps"),
                   aggregation=stored.get("aggregation", row.video.aggregation),
                   run_async=bool(stored.get("async", True)), callback_url=row.video.callback_url,
                   version=stored.get("model_version_id"), pinned="model_version_id" in stored)


# -- the upload on disk ---------------------------------------------------------------------------
@dataclass
class SpooledUpload:
    path: str
    size: int
    sha256: str
    filename: str | None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


_TEMP_NAME = re.compile(r"^d3-(?:video|job)-(\d+)-[^/]*\.upload$")


def temp_prefix(kind: str) -> str:
    # The pid in the name tells a dead worker's leftovers from a live one's (sweep_dead_uploads).
    return f"d3-{kind}-{os.getpid()}-"


def sweep_dead_uploads(directory: str | None = None) -> list[str]:
    """Remove temporary uploads left by processes that died (kill -9, OOM) mid-request or mid-job.

    Run at start-up. Files of live processes (this one included) are kept.
    """
    folder = directory or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, name))
            removed.append(name)
    if removed:
        log.info("removed %d temporary upload(s) of dead workers from %s", len(removed), folder)
    return removed


def spool_upload(stream: IO[bytes], filename: str | None, limit: int, directory: str | None = None) -> SpooledUpload:
    """Copy a stream to a new temporary file, counting and hashing; over `limit` bytes -> 413.

    The temporary file's name carries no client text and no extension, so nothing downstream
    (FFmpeg probes by extension too) can be steered by the filename.
    """
    fd, path = tempfile.mkstemp(prefix=temp_prefix("video"), suffix=".upload", dir=directory)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                chunk = stream.read(COPY_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the video is larger than the limit of {limit} bytes")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return SpooledUpload(path=path, size=size, sha256=digest.hexdigest(), filename=safe_filename(filename))


# -- pure computations (tested directly) --------------------------------------------------------------
def plan_indices(info: ProbeInfo, params: VideoParams, max_frames: int, default_frames: int) -> tuple[list[int], dict]:
    """The frame indices to analyse and a description of how they were chosen."""
    if params.fps is not None:
        wanted = max(1, math.floor(info.duration_s * params.fps + 1e-9))
        sampling = {"mode": "fps", "fps": params.fps}
    else:
        wanted = params.frames or default_frames
        sampling = {"mode": "frames", "frames": wanted}
    capped = min(wanted, max_frames)
    indices = sample_indices(info.frame_count, capped)
    sampling.update({"requested_frames": wanted, "planned_frames": len(indices),
                     "capped": wanted > max_frames, "rule": "index_i = floor((i + 0.5) * frame_count / n)"})
    return indices, sampling


def aggregate(probabilities: list[float], threshold: float) -> dict[str, float]:
    """mean, vote (share of frames over the threshold) and max of the frame probabilities."""
    count = len(probabilities)
    return {"mean": math.fsum(probabilities) / count,
            "vote": sum(1 for p in probabilities if p > threshold) / count,
            "max": max(probabilities)}


def find_segments(frames: list[dict], threshold: float, duration_s: float, planned: int) -> list[dict]:
    """Runs of consecutive sampled frames over the threshold.

    Each frame carries its `position` in the plan; frame k stands for the k-th of `planned` equal
    slices of the video, so a run spans [first slice start, last slice end]. A frame that could
    not be decoded breaks a run.
    """
    slice_s = duration_s / planned if planned else 0.0
    segments: list[dict] = []
    run: list[dict] = []

    def close() -> None:
        if run:
            probabilities = [f["fake_probability"] for f in run]
            segments.append({
                "start_s": round(run[0]["position"] * slice_s, 6),
                "end_s": round(min(duration_s, (run[-1]["position"] + 1) * slice_s), 6),
                "start_frame": run[0]["index"], "end_frame": run[-1]["index"],
                "first_timestamp_s": run[0]["timestamp_s"], "last_timestamp_s": run[-1]["timestamp_s"],
                "frames": len(run), "mean_probability": math.fsum(probabilities) / len(run),
                "max_probability": max(probabilities)})
            run.clear()

    previous = None
    for frame in frames:
        consecutive = previous is not None and frame["position"] == previous + 1
        if frame["fake_probability"] > threshold:
            if run and not consecutive:
                close()
            run.append(frame)
        else:
            close()
        previous = frame["position"]
    close()
    return segments


def top_frames(frames: list[dict], count: int = TOP_FRAMES) -> list[dict]:
    """The most suspicious frames, highest probability first (earlier frame first on ties)."""
    ranked = sorted(frames, key=lambda f: (-f["fake_probability"], f["index"]))[:count]
    return [{"index": f["index"], "timestamp_s": f["timestamp_s"], "fake_probability": f["fake_probability"]}
            for f in ranked]


@dataclass
class Analysis:
    info: ProbeInfo
    frames: list[dict]  # index, timestamp_s, fake_probability, position
    sampling: dict
    decoding: dict
    timings_ms: dict = field(default_factory=dict)
    provenance: dict | None = None
    model_version: str = ""  # of the head that scored every frame
    trained: bool = False


class JobQueue(Protocol):
    """Where a committed job goes to be run (api/tasks.py: threads here; api/worker.py: Celery)."""

    def submit(self, job_id: uuid.UUID) -> None:
        """Hand the job out; Unavailable if the queue cannot take it now."""


# -- the service ------------------------------------------------------------------------------------
class VideoService:
    def __init__(self, db: Database, store: ObjectStore, engine: Engine, settings: Settings,
                 jobs: JobStore, queue: JobQueue | None = None) -> None:
        self.db = db
        self.store = store
        self.engine = engine
        self.settings = settings
        self.provenance_limits = provenance_limits(settings)
        self.jobs = jobs
        # The executor; set by the composition root once it is built (it runs jobs through this service).
        self.queue = queue
        self.keep_warm_decoder = True
        self._submit_lock = threading.Lock()

    # ---------------------------------------------------------------- parameters and upload
    def parse_params(self, threshold: float | None, frames: int | None = None, fps: float | None = None,
                     aggregation: str = "mean", run_async: bool = False,
                     callback_url: str | None = None) -> VideoParams:
        """Typed request values (api/schemas.py checked their types and fixed ranges) -> VideoParams.

        What depends on this server's settings or on more than one value is checked here;
        InvalidInput names the parameter.
        """
        if frames is not None and fps is not None:
            raise InvalidInput("give either frames or fps, not both", parameter="frames")
        limit = self.settings.max_video_frames
        if frames is not None and not 1 <= frames <= limit:
            raise InvalidInput(f"frames must be between 1 and {limit}, got {frames}", parameter="frames")
        if fps is not None and not (math.isfinite(fps) and 0 < fps <= MAX_SAMPLE_FPS):
            raise InvalidInput(f"fps must be above 0 and at most {MAX_SAMPLE_FPS:g}, got {fps}", parameter="fps")
        if aggregation not in AGGREGATIONS:
            raise InvalidInput(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}",
                               parameter="aggregation")
        callback_url = (callback_url or "").strip() or None
        if callback_url is not None:
            check_callback_url(callback_url, self.settings.callback_allow_http, self.settings.callback_allow_private)
            run_async = True  # a callback only makes sense for a job
        head = pin_head(self.engine)  # every frame by this head; its card's threshold unless one is given
        return VideoParams(threshold=resolve_threshold(threshold, head, self.settings), frames=frames, fps=fps,
                           aggregation=aggregation, run_async=run_async, callback_url=callback_url, head=head)

    def spool(self, stream: IO[bytes], filename: str | None) -> SpooledUpload:
        return spool_upload(stream, filename, self.settings.max_video_bytes)

    # ---------------------------------------------------------------- submit (request thread)
    def submit(self, upload: SpooledUpload, params: VideoParams, owner: str | None,
               base_url: str | None = None) -> series.Submission:
        """Analyse now (the result) or queue a job (the job). The caller removes the upload."""
        started = time.perf_counter()
        container = self._sniff(upload.path)
        reader = self.open_reader(upload.path)
        try:
            info = self.probe(reader, container)
            as_job = (params.run_async or upload.size > self.settings.video_async_bytes
                      or info.duration_s > self.settings.video_async_seconds)
            if as_job:
                reader.close()
                row = self._create_job(upload, info, params, owner, base_url, container)
                return series.Submission(self.public_body(row, None), queued=True)
            analysis = self._analyze(reader, info, params)
        finally:
            reader.close()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        row = self._store_result(upload, analysis, params, owner, container, elapsed_ms)
        return series.Submission(self.public_body(row, analysis.frames, analysis), queued=False)

    # ---------------------------------------------------------------- probing and analysis
    def analyze_file(self, path: str, params: VideoParams,
                     progress: Callable[[int, int], None] | None = None) -> Analysis:
        """A job's analysis: the stored upload, sniffed and probed again (the file is untrusted still)."""
        container = self._sniff(path)
        with self.open_reader(path) as reader:
            info = self.probe(reader, container)
            return self._analyze(reader, info, params, progress=progress)

    def open_reader(self, path: str, timeout_s: float | None = None) -> VideoReader:
        """A decoding session in a child process with this server's time and memory limits."""
        return VideoReader(path, timeout_s or self.settings.video_decode_timeout_s,
                           self.settings.video_decode_memory_mb, keep_warm=self.keep_warm_decoder)

    @staticmethod
    def _sniff(path: str) -> str:
        try:
            return sniff(path)
        except VideoDecodeError as exc:
            raise UnprocessableMedia(exc.message, reason=exc.kind) from None

    def probe(self, reader: VideoReader, container: str) -> ProbeInfo:
        """Probe facts, or the 422/413 that says why this file cannot be analysed."""
        try:
            info = reader.probe()
        except VideoDecodeError as exc:
            raise UnprocessableMedia(exc.message, reason=exc.kind) from None
        if info.duration_s > self.settings.max_video_seconds:
            raise PayloadTooLarge(f"the video is {info.duration_s:.1f} s long, over the limit of "
                                  f"{self.settings.max_video_seconds:g} s", reason="too_long")
        pixels = info.width * info.height
        if pixels > self.settings.max_image_pixels:
            raise PayloadTooLarge(f"video frames are {info.width}x{info.height} = {pixels} pixels, over the limit "
                                  f"of {self.settings.max_image_pixels}", reason="too_many_pixels")
        return info

    def _analyze(self, reader: VideoReader, info: ProbeInfo, params: VideoParams,
                 progress: Callable[[int, int], None] | None = None) -> Analysis:
        indices, sampling = plan_indices(info, params, self.settings.max_video_frames,
                                         self.settings.default_video_frames)
        head = params.head
        if head is None:  # a job: the head pinned at submission (by id), or the active one for older jobs
            head = self.engine.head(params.version or CONFIGURED) if params.pinned else pin_head(self.engine)
        total = len(indices)
        frames: list[dict] = []
        pending: list[tuple[int, int, Any]] = []  # position, index, tensor
        counters = {"done": 0, "skipped": 0, "inference_s": 0.0, "preprocess_s": 0.0}
        scorers: set[str] = set()  # model versions that scored the chunks: exactly the pinned head's

        def flush() -> None:
            if pending:
                started = time.perf_counter()
                scored = run_engine(self.engine, [tensor for _, _, tensor in pending], head)
                scorers.add(scored.head.model_version)
                counters["inference_s"] += time.perf_counter() - started
                for (position, index, _), probability in zip(pending, scored.probabilities, strict=True):
                    frames.append({"index": index, "timestamp_s": round(index / info.fps, 6),
                                   "fake_probability": float(probability), "position": position})
                counters["done"] += len(pending)
                pending.clear()
            if progress is not None:
                progress(counters["done"] + counters["skipped"], total)

        decode_started = time.perf_counter()
        try:
            for frame in reader.frames(indices, IMAGE_SIZE):
                if frame.rgb is None:
                    counters["skipped"] += 1
                    continue
                started = time.perf_counter()
                # The child squashed the frame to 224x224 with Pillow's bilinear filter (spec §1 step 2);
                # preprocess_image's own resize to the same size is then an exact copy.
                image = Image.frombytes("RGB", (frame.width, frame.height), frame.rgb)
                pending.append((frame.position, frame.index, preprocess_image(image)))
                counters["preprocess_s"] += time.perf_counter() - started
                if len(pending) >= INFERENCE_CHUNK:
                    flush()
            flush()
        except VideoDecodeError as exc:
            raise UnprocessableMedia(exc.message, reason=exc.kind) from None
        if not frames:
            raise UnprocessableMedia("none of the sampled frames could be decoded", reason="no_frames")
        wall_s = time.perf_counter() - decode_started
        decoding = dict(reader.stats)
        decoding["skipped_frames"] = counters["skipped"]
        timings = {"probe_ms": round(info.probe_s * 1000, 3), "decode_and_infer_ms": round(wall_s * 1000, 3),
                   "decode_ms": round(float(decoding.get("decode_s", 0.0)) * 1000, 3),
                   "preprocess_ms": round(counters["preprocess_s"] * 1000, 3),
                   "inference_ms": round(counters["inference_s"] * 1000, 3)}
        # The container's metadata, read beside the verdict and never feeding it (docs/PROVENANCE.md).
        provenance = read_provenance_of_file(reader.path, self.provenance_limits)
        if len(scorers) > 1:  # a tier that could not keep the pin: never store a mix under one version
            raise Unavailable(f"the frames were scored by different model versions ({', '.join(sorted(scorers))}); "
                              "retry", retry_after=2)
        return Analysis(info=info, frames=frames, sampling=sampling, decoding=decoding, timings_ms=timings,
                        provenance=provenance, model_version=scorers.pop() if scorers else head.model_version,
                        trained=head.trained)

    # ---------------------------------------------------------------- results
    def _result_fields(self, analysis: Analysis, params: VideoParams) -> dict[str, Any]:
        probabilities = [f["fake_probability"] for f in analysis.frames]
        aggregates = aggregate(probabilities, params.threshold)
        chosen = aggregates[params.aggregation]
        label, confidence = verdict(chosen, params.threshold)
        segments = find_segments(analysis.frames, params.threshold, analysis.info.duration_s,
                                 analysis.sampling["planned_frames"])
        return {"aggregates": aggregates, "fake_probability": chosen, "prediction": label, "confidence": confidence,
                "segments": segments, "top_frames": top_frames(analysis.frames)}

    def _documents(self, row: Prediction, analysis: Analysis) -> list[tuple[str, str, bytes, str]]:
        """The frames JSON, the summary JSON and the timeline PNG of a finished row."""
        video = row.video
        frames_doc = {"id": str(row.id), "fps": analysis.info.fps, "frame_count": analysis.info.frame_count,
                      "duration_s": analysis.info.duration_s, "threshold": row.threshold,
                      "sampling": analysis.sampling, "frames": _public_frames(analysis.frames)}
        summary = serialize_prediction(row, None, self.settings)
        summary.update(self.video_fields(row, None, urls=False))
        summary["trained_model"] = analysis.trained
        png = render_timeline(analysis.frames, video.segments or [], analysis.info.duration_s, row.threshold,
                              title=f"{(row.filename or str(row.id))[:60]}: {row.prediction} "
                                    f"({video.aggregation} {row.fake_probability:.3f})")
        return [(self.settings.bucket_frames, video.frames_object, json.dumps(frames_doc).encode(), "application/json"),
                (self.settings.bucket_results, row.result_object, json.dumps(summary).encode(), "application/json"),
                (self.settings.bucket_results, series.timeline_key(row), png, "image/png")]

    def _fill(self, row: Prediction, analysis: Analysis, params: VideoParams, elapsed_ms: float) -> None:
        fields = self._result_fields(analysis, params)
        video = row.video
        row.prediction, row.confidence = fields["prediction"], fields["confidence"]
        row.fake_probability = fields["fake_probability"]
        row.model_version = analysis.model_version
        row.processing_ms = round(elapsed_ms, 3)
        row.width, row.height = analysis.info.width, analysis.info.height
        if analysis.provenance is not None:
            record_provenance(row, analysis.provenance)
        row.result_object = row.result_object or object_key(str(row.id), ".json", row.created_at)
        video.duration_s, video.fps = analysis.info.duration_s, analysis.info.fps
        video.frame_count, video.codec = analysis.info.frame_count, analysis.info.codec[:32]
        video.frames_analyzed = len(analysis.frames)
        video.mean_probability = fields["aggregates"]["mean"]
        video.vote_share = fields["aggregates"]["vote"]
        video.max_probability = fields["aggregates"]["max"]
        video.segments, video.top_frames = fields["segments"], fields["top_frames"]
        video.frames_object = video.frames_object or object_key(str(row.id), ".frames.json", row.created_at)
        video.progress_done = video.progress_total = analysis.sampling["planned_frames"]
        video.params = {**(video.params or {}), "sampling": analysis.sampling, "decoding": analysis.decoding,
                        "timings_ms": analysis.timings_ms}

    def _store_result(self, upload: SpooledUpload, analysis: Analysis, params: VideoParams, owner: str | None,
                      container: str, elapsed_ms: float) -> Prediction:
        """Sync path: objects first, then both rows in one transaction; on failure nothing remains."""
        prediction_id = uuid.uuid4()
        now = datetime.now(timezone.utc)
        row = Prediction(id=prediction_id, created_at=now, media_type="video", filename=upload.filename,
                         sha256=upload.sha256, size_bytes=upload.size, threshold=params.threshold,
                         model_version=analysis.model_version, owner=owner, status="done")
        row.video = VideoPrediction(container=container, aggregation=params.aggregation, params=params.as_dict(),
                                    progress_done=0, progress_total=0)
        self._fill(row, analysis, params, elapsed_ms)
        objects = self._documents(row, analysis)
        if self.settings.keep_videos:
            row.media_object = object_key(str(prediction_id), CONTAINER_SUFFIX.get(container, ".bin"), now)
            objects.insert(0, (self.settings.bucket_videos, row.media_object, upload.path, "video/octet-stream"))
        insert_with_objects(self.db, self.store, row, objects)
        return row

    # ---------------------------------------------------------------- jobs
    def active_jobs(self, owner: str | None) -> int:
        return self.jobs.count_active(owner)

    def _create_job(self, upload: SpooledUpload, info: ProbeInfo, params: VideoParams, owner: str | None,
                    base_url: str | None, container: str) -> Prediction:
        if self.queue is None:
            raise Unavailable("video jobs are not accepted by this process")
        limit = self.settings.video_jobs_per_key
        with self._submit_lock:  # check-then-insert is atomic within this process
            active = self.active_jobs(owner)
            if active >= limit:
                raise TooManyJobs(f"{active} video jobs of this caller are already queued or running (limit {limit}); "
                                  "wait for one to finish", limit=limit)
            prediction_id = uuid.uuid4()
            now = datetime.now(timezone.utc)
            indices, sampling = plan_indices(info, params, self.settings.max_video_frames,
                                             self.settings.default_video_frames)
            upload_key = object_key(str(prediction_id), CONTAINER_SUFFIX.get(container, ".bin"), now)
            row = Prediction(id=prediction_id, created_at=now, media_type="video", filename=upload.filename,
                             sha256=upload.sha256, size_bytes=upload.size, width=info.width, height=info.height,
                             threshold=params.threshold,
                             model_version=(params.head.model_version if params.head else "") or "pending",
                             owner=owner)
            row.video = VideoPrediction(
                container=container, codec=info.codec[:32], duration_s=info.duration_s, fps=info.fps,
                frame_count=info.frame_count, aggregation=params.aggregation, upload_object=upload_key,
                progress_done=0, progress_total=len(indices), callback_url=params.callback_url,
                params={**params.as_dict(), "async": True, "base_url": base_url, "sampling": sampling})
            self.jobs.create(row, upload.path)
        try:
            self.queue.submit(prediction_id)
        except Unavailable:
            self.jobs.discard(prediction_id)  # nothing half-written: no row, no upload
            raise
        return row

    def result_filler(self, analysis: Analysis, params: VideoParams,
                      elapsed_ms: float) -> Callable[[Prediction], list[StoredObject]]:
        """For JobStore.complete: sets a job row's result fields and names the objects to store."""
        def fill(row: Prediction) -> list[StoredObject]:
            self._fill(row, analysis, params, elapsed_ms)
            return self._documents(row, analysis)

        return fill

    def final_body(self, job_id: uuid.UUID) -> tuple[str, dict[str, Any]] | None:
        """(callback URL, what GET /predictions/<id> shows) with links absolute against the submitting request."""
        row = self.jobs.load(job_id)
        if row is None or row.video is None or not row.video.callback_url:
            return None
        body = serialize_prediction(row, self.store, self.settings)
        body.update(self.detail(row))
        base = (row.video.params or {}).get("base_url")
        for name in ("result_url", "timeline_url"):
            if base and isinstance(body.get(name), str) and body[name].startswith("/"):
                body[name] = urljoin(base, body[name])
        body.pop("callback", None)
        return row.video.callback_url, body

    # ---------------------------------------------------------------- reading back
    def public_body(self, row: Prediction, frames: list[dict] | None, analysis: Analysis | None = None) -> dict:
        body = serialize_prediction(row, self.store, self.settings)
        body.update(self.video_fields(row, frames))
        if analysis is not None:
            body["timings_ms"] = analysis.timings_ms
        return body

    def video_fields(self, row: Prediction, frames: list[dict] | None, urls: bool = True) -> dict[str, Any]:
        """The video part of a prediction's JSON (added to the image-shaped fields)."""
        video = row.video
        if video is None:
            return {}
        params = video.params or {}
        body = series.common_fields(row)
        body.update({
            "frames_analyzed": video.frames_analyzed,
            "fps": video.fps,
            "frame_count": video.frame_count,
            "sampling": params.get("sampling"),
            "decoding": params.get("decoding"),
            "top_frames": video.top_frames,
        })
        if frames is not None:
            body["frames"] = _public_frames(frames)
        if video.callback_url:
            body["callback"] = {"url": video.callback_url, "status": video.callback_status}
        if urls:
            body["timeline_url"] = series.timeline_url(self.store, self.settings, row)
        return body

    def detail(self, row: Prediction) -> dict[str, Any]:
        """GET /predictions/<id> for a video: progress while queued/running, everything once done."""
        if row.media_type != "video" or row.video is None:
            return {}
        frames = series.read_items(self.store, self.settings, row, "frames")
        body = self.video_fields(row, frames)
        if row.status == "done" and frames is None:
            body["frames"] = None
        return body

    def timeline_png(self, row: Prediction) -> bytes:
        """The stored timeline picture; re-drawn from the per-frame results if the object is gone."""
        if row.media_type != "video" or row.video is None:
            raise NotFound(f"prediction {row.id} is not a video: it has no timeline")
        png = series.stored_timeline(self.store, self.settings, row)
        if png is not None:
            return png
        try:
            document = json.loads(self.store.get_bytes(self.settings.bucket_frames, row.video.frames_object))
        except (ObjectNotFound, ValueError):
            raise NotFound(f"the results of prediction {row.id} are no longer stored") from None
        return render_timeline(document["frames"], row.video.segments or [], row.video.duration_s or 0.0,
                               row.threshold)


def _public_frames(frames: list[dict]) -> list[dict]:
    return [{"index": f["index"], "timestamp_s": f["timestamp_s"], "fake_probability": f["fake_probability"]}
            for f in frames]
