"""POST /predict and /predict/batch: images in, verdicts out."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api import UNTRAINED_WARNING
from api.context import services
from api.errors import error_body, status_for
from api.routes.common import absolute_url, current_caller, parse_bool, parse_threshold
from api.services.errors import InvalidInput, PayloadTooLarge, ServiceError
from api.services.predictions import Upload, safe_filename

bp = Blueprint("predict", __name__)

MULTIPART_OVERHEAD = 64 * 1024


def _read_upload(storage, limit: int) -> Upload:
    data = storage.stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"file is larger than the limit of {limit} bytes")
    return Upload(data=data, filename=storage.filename)


def _shape(body: dict) -> dict:
    body["result_url"] = absolute_url(body.get("result_url"))
    if not services().engine.trained:
        body["warning"] = UNTRAINED_WARNING
    return body


@bp.post("/predict")
def predict():
    svc = services()
    request.max_content_length = svc.settings.max_image_bytes + MULTIPART_OVERHEAD
    threshold = parse_threshold(svc.settings.default_threshold)
    reuse = parse_bool("reuse", True)
    storage = request.files.get("file")
    if storage is None:
        raise InvalidInput("multipart field 'file' is required", parameter="file")
    upload = _read_upload(storage, svc.settings.max_image_bytes)
    [result] = svc.predictions.predict_images([upload], threshold, current_caller().owner, reuse)
    if isinstance(result, ServiceError):
        raise result
    return jsonify(_shape(result))


@bp.post("/predict/batch")
def predict_batch():
    svc = services()
    limit = svc.settings.max_batch_files
    request.max_content_length = (svc.settings.max_image_bytes + MULTIPART_OVERHEAD) * limit
    threshold = parse_threshold(svc.settings.default_threshold)
    reuse = parse_bool("reuse", True)
    files = request.files.getlist("files")
    if not files:
        raise InvalidInput("multipart field 'files' is required (repeat it once per image)", parameter="files")
    if len(files) > limit:
        raise InvalidInput(f"at most {limit} files per batch, got {len(files)}", parameter="files")
    outcomes: list = [None] * len(files)
    readable: list[tuple[int, Upload]] = []
    for index, storage in enumerate(files):
        try:
            readable.append((index, _read_upload(storage, svc.settings.max_image_bytes)))
        except PayloadTooLarge as exc:
            outcomes[index] = exc
    predicted = svc.predictions.predict_images([u for _, u in readable], threshold, current_caller().owner, reuse)
    for (index, _), outcome in zip(readable, predicted, strict=True):
        outcomes[index] = outcome

    results = []
    for index, (storage, outcome) in enumerate(zip(files, outcomes, strict=True)):
        if isinstance(outcome, ServiceError):
            entry = {"index": index, "filename": safe_filename(storage.filename), "status": status_for(outcome)}
            entry.update(error_body(outcome.code, outcome.message))
            results.append(entry)
        else:
            results.append({"index": index, **_shape(outcome)})
    failed = sum(1 for r in results if "error" in r)
    return jsonify({"count": len(results), "succeeded": len(results) - failed, "failed": failed,
                    "results": results})
