"""POST /predict and /predict/batch: images in, verdicts out."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api.auth import current_caller
from api.context import services
from api.detector.config import UNTRAINED_WARNING
from api.errors import error_body, status_for
from api.exceptions import InvalidInput, ServiceError
from api.openapi import Response, ViewResult, api_spec
from api.routes.common import absolute_links, limit_body
from api.schemas import BatchResult, ErrorBody, ImageFile, ImageFiles, ImageParams, Prediction
from api.services.predictions import safe_filename

bp = Blueprint("predict", __name__)

UNAVAILABLE = (ErrorBody, "Model, database or object store unavailable, or overloaded; see Retry-After.")


@bp.before_request
def _body_limit() -> None:
    settings = services().settings
    limit_body(settings.max_image_bytes, settings.max_batch_files if request.endpoint == "predict.predict_batch" else 1)


def _shape(body: dict) -> dict:
    absolute_links(body)
    if not services().engine.trained:
        body["warning"] = UNTRAINED_WARNING
    return body


def _required(form, field: str):
    # spectree reads only form bodies: another content type leaves `form` unset.
    if form is None:
        raise InvalidInput(f"send multipart/form-data with a '{field}' file part", parameter=field)
    return form


@bp.post("/predict")
@api_spec.validate(tags=["predict"], operation_id="predictImage", resp=Response(
    HTTP_200=(Prediction, "The stored verdict (or the earlier one for the same bytes: reused true)"),
    HTTP_413=(ErrorBody, "Over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS"),
    HTTP_415=(ErrorBody, "Not JPEG, PNG, WebP, BMP, GIF or TIFF"),
    HTTP_422=(ErrorBody, "Truncated or corrupt image"),
    HTTP_503=UNAVAILABLE))
def predict(query: ImageParams, form: ImageFile) -> ViewResult:
    """Predict one image"""
    form = _required(form, "file")
    svc = services()
    threshold = query.threshold  # None: the active model version's default (its card, else DEFAULT_THRESHOLD)
    upload = svc.predictions.read_upload(form.file.stream, form.file.filename)
    [result] = svc.predictions.predict_images([upload], threshold, current_caller().owner, query.reuse)
    if isinstance(result, ServiceError):
        raise result
    return jsonify(_shape(result))


@bp.post("/predict/batch")
@api_spec.validate(tags=["predict"], operation_id="predictImageBatch", resp=Response(
    HTTP_200=(BatchResult, "One entry per file, in order; a bad file carries its own error"),
    HTTP_413=(ErrorBody, "Request body too large"),
    HTTP_503=UNAVAILABLE))
def predict_batch(query: ImageParams, form: ImageFiles) -> ViewResult:
    """Predict up to MAX_BATCH_FILES images"""
    form = _required(form, "files")
    svc = services()
    files = form.files
    outcomes = svc.predictions.predict_uploads([(f.stream, f.filename) for f in files], query.threshold,
                                               current_caller().owner, query.reuse)
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
