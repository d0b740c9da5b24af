"""Image predictions: decode, run the engine, store the JSON result and the row, all or nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select

from api.config import Settings
from api.database import Database
from api.detector import EngineNotReady, EngineOverloaded, EngineTimeout, InferenceError, preprocess_image
from api.detector.interface import Engine
from api.detector.versions import Head, Scores
from api.exceptions import InvalidInput, PayloadTooLarge, ServiceError, Unavailable
from api.models import Prediction, iso
from api.services.records import insert_with_objects
from api.storage import ObjectStore, StoreUnavailable, object_key
from api.utils.images import decode_image
from api.utils.provenance import ProvenanceLimits, read_provenance

log = logging.getLogger(__name__)


# Pillow's format name -> the MIME type the C2PA reader is given.
IMAGE_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp",
              "GIF": "image/gif", "TIFF": "image/tiff"}


def provenance_limits(settings: Settings) -> ProvenanceLimits:
    """The reader's limits and the operator's C2PA trust list (read once, when a service is built)."""
    anchors = None
    if settings.c2pa_trust_anchors:
        anchors = Path(settings.c2pa_trust_anchors).read_text(encoding="utf-8")
    return ProvenanceLimits(timeout_s=settings.provenance_timeout_s, memory_mb=settings.provenance_memory_mb,
                            max_xmp_bytes=settings.provenance_max_xmp_bytes, trust_anchors_pem=anchors)


def record_provenance(row: Prediction, block: dict[str, Any]) -> None:
    row.provenance = block
    row.declared_ai = block["declared_ai"]
    row.c2pa_present = bool(block["c2pa"].get("present"))


@dataclass(frozen=True)
class Upload:
    data: bytes
    filename: str | None


def verdict(probability: float, threshold: float) -> tuple[str, float]:
    """The authors' rule: fake when p > threshold. Confidence is the predicted class's probability."""
    if probability > threshold:
        return "fake", probability
    return "real", 1.0 - probability


def safe_filename(name: str | None) -> str | None:
    """Keep a client filename for display only: last path part, printable, at most 255 chars."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    return name[:255] or None


def resolve_threshold(threshold: float | None, head: Head, settings: Settings) -> float:
    """The request's threshold, else the default of the version's model card, else DEFAULT_THRESHOLD."""
    if threshold is not None:
        return threshold
    return head.threshold if head.threshold is not None else settings.default_threshold


def pin_head(engine: Engine) -> Head:
    """The head this request is scored by, chosen once at its start (api/detector/versions.py)."""
    return engine.head()


def run_engine(engine: Engine, tensors: Sequence, head: Head | None = None) -> Scores:
    """Engine call (every image by `head`) with its failures turned into the service's 503."""
    with model_failures():
        return engine.score(list(tensors), head=head)


@contextmanager
def model_failures() -> Iterator[None]:
    """A model's failures (in this process or the inference tier, any modality) as the service's 503."""
    try:
        yield
    except EngineOverloaded as exc:
        raise Unavailable("the detector is overloaded; retry shortly",
                          retry_after=max(1, int(getattr(exc, "retry_after", 1)))) from None
    except EngineNotReady:
        raise Unavailable("the model is still loading; retry shortly", retry_after=10) from None
    except EngineTimeout:
        raise Unavailable("the detector did not answer in time; retry shortly", retry_after=5) from None
    except InferenceError as exc:
        log.error("inference failed: %s", exc)
        raise Unavailable("the detector failed on this request; retry shortly", retry_after=5) from None


class PredictionService:
    def __init__(self, db: Database, store: ObjectStore, engine: Engine, settings: Settings) -> None:
        self.db = db
        self.store = store
        self.engine = engine
        self.settings = settings
        self.provenance_limits = provenance_limits(settings)

    # -- public -----------------------------------------------------------
    def read_upload(self, stream: IO[bytes], filename: str | None) -> Upload:
        """An uploaded image's bytes, reading no more than one byte past MAX_IMAGE_BYTES."""
        limit = self.settings.max_image_bytes
        data = stream.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"file is larger than the limit of {limit} bytes")
        return Upload(data=data, filename=filename)

    def predict_uploads(self, files: Sequence[tuple[IO[bytes], str | None]], threshold: float | None,
                        owner: str | None, reuse: bool = True) -> list[dict[str, Any] | ServiceError]:
        """A batch request's files (stream, filename), at most MAX_BATCH_FILES: one result per file,
        in order, a file over the size limit carrying its own error like any other bad file."""
        limit = self.settings.max_batch_files
        if len(files) > limit:
            raise InvalidInput(f"at most {limit} files per batch, got {len(files)}", parameter="files")
        outcomes: dict[int, dict[str, Any] | ServiceError] = {}
        readable: list[tuple[int, Upload]] = []
        for index, (stream, filename) in enumerate(files):
            try:
                readable.append((index, self.read_upload(stream, filename)))
            except PayloadTooLarge as exc:
                outcomes[index] = exc
        predicted = self.predict_images([upload for _, upload in readable], threshold, owner, reuse)
        for (index, _), outcome in zip(readable, predicted, strict=True):
            outcomes[index] = outcome
        return [outcomes[index] for index in range(len(files))]

    def predict_images(self, uploads: Sequence[Upload], threshold: float | None, owner: str | None,
                       reuse: bool = True) -> list[dict[str, Any] | ServiceError]:
        """One result per upload, in order: a stored prediction, or the error for that file.

        Every upload of the call is scored by the one head active when it starts, and the threshold
        not given is that head's default. Input errors stay per file; a model/database/store failure
        raises and fails the request.
        """
        started = time.perf_counter()
        head = pin_head(self.engine)
        threshold = resolve_threshold(threshold, head, self.settings)
        results: list[dict[str, Any] | ServiceError | None] = [None] * len(uploads)
        pending: list[tuple[int, Upload, str, Any]] = []  # index, upload, sha256, decoded
        for index, upload in enumerate(uploads):
            digest = hashlib.sha256(upload.data).hexdigest()
            try:
                if len(upload.data) > self.settings.max_image_bytes:
                    raise PayloadTooLarge(
                        f"file is {len(upload.data)} bytes, over the limit of {self.settings.max_image_bytes}")
                if reuse:
                    stored = self._find_reusable(digest, threshold, owner, head.model_version)
                    if stored is not None:
                        results[index] = stored
                        continue
                pending.append((index, upload, digest, decode_image(upload.data, self.settings.max_image_pixels)))
            except Unavailable:
                raise  # an outside system is down: the whole request fails (503), not this file
            except ServiceError as exc:
                results[index] = exc

        if pending:
            # Preprocess here (request thread); the engine batches the forward passes.
            tensors = [preprocess_image(decoded.image) for _, _, _, decoded in pending]
            scored = run_engine(self.engine, tensors, head)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            for (index, upload, digest, decoded), probability in zip(pending, scored.probabilities, strict=True):
                # Metadata is read beside the verdict and never feeds it (docs/PROVENANCE.md).
                provenance = read_provenance(upload.data, IMAGE_MIME.get(decoded.format, "image/*"),
                                             self.provenance_limits)
                results[index] = self._store(upload, digest, decoded, float(probability), threshold, owner,
                                             elapsed_ms, provenance, scored.head)
        return results  # type: ignore[return-value]

    # -- internals --------------------------------------------------------
    def _find_reusable(self, digest: str, threshold: float, owner: str | None,
                       model_version: str) -> dict[str, Any] | None:
        query = (select(Prediction)
                 .where(Prediction.sha256 == digest, Prediction.media_type == "image",
                        Prediction.status == "done", Prediction.threshold == threshold,
                        Prediction.model_version == model_version, Prediction.owner == owner)
                 .order_by(Prediction.created_at.desc()).limit(1))
        with self.db.session() as session:
            row = session.scalars(query).first()
        if row is None:
            return None
        body = serialize_prediction(row, self.store, self.settings)
        body["reused"] = True
        body["notes"] = [f"reused: these bytes were scored before with the same threshold and model version "
                         f"(prediction {row.id}, {body['created_at']}); this is that stored result, not a new "
                         "analysis. Send reuse=false to run the model again and store a new prediction"]
        return body

    def _store(self, upload: Upload, digest: str, decoded, probability: float, threshold: float,
               owner: str | None, elapsed_ms: float, provenance: dict[str, Any], head: Head) -> dict[str, Any]:
        label, confidence = verdict(probability, threshold)
        prediction_id = uuid.uuid4()
        now = datetime.now(timezone.utc)
        row = Prediction(
            id=prediction_id, created_at=now, media_type="image", filename=safe_filename(upload.filename),
            sha256=digest, size_bytes=len(upload.data), width=decoded.width, height=decoded.height,
            prediction=label, fake_probability=probability, confidence=confidence, threshold=threshold,
            model_version=head.model_version, processing_ms=round(elapsed_ms, 3),
            result_object=object_key(str(prediction_id), ".json", now), status="done", owner=owner)
        record_provenance(row, provenance)
        document = serialize_prediction(row, None, self.settings)
        notes = list(decoded.notes)
        document["input"] = {"format": decoded.format, "mode": decoded.image.mode, "size_bytes": len(upload.data),
                             "trained_model": head.trained, "notes": notes}
        self.save(row, document)
        body = serialize_prediction(row, self.store, self.settings)
        body.update(reused=False, notes=notes)
        return body

    def save(self, row: Prediction, document: dict[str, Any]) -> None:
        insert_with_objects(self.db, self.store, row, [
            (self.settings.bucket_results, row.result_object, json.dumps(document).encode(), "application/json")])


def serialize_prediction(row: Prediction, store: ObjectStore | None, settings: Settings) -> dict[str, Any]:
    """The public JSON of a prediction; with a store, a fresh `result_url` is signed."""
    body: dict[str, Any] = {
        "id": str(row.id),
        "media_type": row.media_type,
        "status": row.status,
        "prediction": row.prediction,
        "fake_probability": row.fake_probability,
        "confidence": row.confidence,
        "threshold": row.threshold,
        "model_version": row.model_version,
        "sha256": row.sha256,
        "filename": row.filename,
        "size_bytes": row.size_bytes,
        "width": row.width,
        "height": row.height,
        "processing_ms": row.processing_ms,
        "created_at": iso(row.created_at),
        "provenance": row.provenance,  # what the metadata claims; the verdict above ignores it
    }
    if row.error:
        body["error"] = row.error
    if store is not None:
        body["result_url"] = None
        if row.result_object and row.status == "done":
            try:
                body["result_url"] = store.presigned_get_url(settings.bucket_results, row.result_object,
                                                             settings.result_url_expiry_s)
            except StoreUnavailable:
                log.warning("could not sign result URL for %s", row.id)
    return body
