"""Text predictions: parse, score with Fast-DetectGPT, store the row and the JSON result.

A text arrives as JSON ({"text": ...}) or as a UTF-8 file; it is scored as it is (no cleaning, as
the authors do). The row (media_type text) holds the verdict; the stored JSON holds the criterion,
token counts and per-chunk criteria; the text itself is kept only when KEEP_TEXTS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import IO, Any

from api.database import Database
from api.detector.interface import InputTooLong, InputTooShort
from api.detector.registry import DetectorRegistry
from api.exceptions import InvalidInput, PayloadTooLarge, Unavailable, UnprocessableMedia
from api.models import Prediction
from api.services.predictions import model_failures, safe_filename, serialize_prediction, verdict
from api.services.records import insert_with_objects
from api.storage import ObjectNotFound, ObjectStore, StoreUnavailable, object_key

log = logging.getLogger(__name__)

CRITERION_MEANING = ("Fast-DetectGPT analytic criterion (higher = more machine-like); fake_probability is the "
                     "authors' two-Gaussian display mapping of it (not monotone: rank by criterion)")


def decode_text_file(data: bytes, limit: int) -> str:
    """A UTF-8 file's text; 413 over `limit` bytes, 422 when it is not UTF-8 text."""
    if len(data) > limit:
        raise PayloadTooLarge(f"the text file is {len(data)} bytes, over the limit of {limit}", reason="too_large")
    if not data:
        raise UnprocessableMedia("the file is empty (0 bytes)", reason="empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnprocessableMedia(f"the file is not UTF-8 text (invalid byte at offset {exc.start})",
                                 reason="not_utf8") from None
    if "\x00" in text:
        raise UnprocessableMedia("the file holds NUL bytes: it is binary, not text", reason="not_text")
    return text.removeprefix("\ufeff")  # a byte-order mark belongs to the file, not to the text


class TextService:
    def __init__(self, db: Database, store: ObjectStore, detectors: DetectorRegistry, settings: Any) -> None:
        self.db = db
        self.store = store
        self.detectors = detectors
        self.settings = settings

    def check_json_size(self, content_length: int | None) -> None:
        """413 for a JSON body over MAX_TEXT_BYTES (a file is checked as it is read)."""
        limit = self.settings.max_text_bytes
        if content_length is not None and content_length > limit:
            raise PayloadTooLarge(f"the JSON body is over the limit of {limit} bytes", reason="too_large")

    def read_file(self, stream: IO[bytes]) -> str:
        """An uploaded file's text, reading no more than one byte past MAX_TEXT_BYTES."""
        limit = self.settings.max_text_bytes
        return decode_text_file(stream.read(limit + 1), limit)

    def predict(self, text: str, threshold: float | None, owner: str | None,
                filename: str | None = None) -> dict[str, Any]:
        """Score, store and describe one text; `threshold` None: DEFAULT_THRESHOLD."""
        started = time.perf_counter()
        threshold = self.settings.default_threshold if threshold is None else threshold
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("text must be a non-empty string", parameter="text")
        detector = self.detectors.get("text")  # DetectorUnavailable: the API's 503, naming a missing model
        try:
            with model_failures():  # the inference tier's overload, timeout, outage: their own 503s
                score = detector.predict([text])[0]
        except InputTooShort as exc:
            raise UnprocessableMedia(exc.message, reason="too_short", minimum_tokens=exc.minimum,
                                     tokens=exc.got) from None
        except InputTooLong as exc:
            raise PayloadTooLarge(exc.message, reason=f"too_many_{exc.unit}", limit=exc.limit) from None
        except Unavailable:
            raise
        except Exception as exc:  # the models failed (out of memory, ...), not the text
            log.exception("Fast-DetectGPT failed")
            raise Unavailable("the text detector failed on this request; retry shortly") from exc
        data = text.encode("utf-8")
        label, confidence = verdict(score.fake_probability, threshold)
        now = datetime.now(timezone.utc)
        row = Prediction(id=uuid.uuid4(), created_at=now, media_type="text", filename=safe_filename(filename),
                         sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), prediction=label,
                         fake_probability=score.fake_probability, confidence=confidence, threshold=threshold,
                         model_version=detector.model_version, owner=owner, status="done",
                         processing_ms=round((time.perf_counter() - started) * 1000.0, 3))
        row.result_object = object_key(str(row.id), ".json", now)
        detail = self.text_fields(score.detail or {}, len(text), detector.describe().get("calibration"))
        document = {**serialize_prediction(row, None, self.settings), **detail, "trained_model": detector.trained}
        objects = [(self.settings.bucket_results, row.result_object, json.dumps(document).encode(),
                    "application/json")]
        if self.settings.keep_texts:
            row.media_object = object_key(str(row.id), ".txt", now)
            objects.insert(0, (self.settings.bucket_media, row.media_object, data, "text/plain; charset=utf-8"))
        insert_with_objects(self.db, self.store, row, objects)
        return {**serialize_prediction(row, self.store, self.settings), **detail}

    @staticmethod
    def text_fields(detail: dict[str, Any], characters: int, calibration: str | None) -> dict[str, Any]:
        return {"criterion": detail.get("criterion"), "criterion_meaning": CRITERION_MEANING,
                "calibration": calibration, "characters": characters, "tokens": detail.get("tokens"),
                "scored_tokens": detail.get("scored_tokens"), "chunks": detail.get("chunks")}

    def detail(self, row: Prediction) -> dict[str, Any]:
        """GET /predictions/<id> for a text: the stored criterion and chunks."""
        try:
            document = json.loads(self.store.get_bytes(self.settings.bucket_results, row.result_object))
        except (ObjectNotFound, StoreUnavailable, ValueError, TypeError):
            log.warning("text result of %s could not be read", row.id)
            return {"criterion": None, "chunks": None}
        keys = ("criterion", "criterion_meaning", "calibration", "characters", "tokens", "scored_tokens", "chunks")
        return {key: document.get(key) for key in keys}
