"""POST /predict/text: a text (JSON or a UTF-8 file) in, Fast-DetectGPT's verdict out."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api.auth import current_caller
from api.context import services
from api.detector.config import UNTRAINED_WARNING
from api.exceptions import InvalidInput
from api.openapi import Response, ViewResult, api_spec
from api.routes.common import absolute_links, limit_body
from api.schemas import ErrorBody, TextBody, TextFile, TextParams, TextPrediction

bp = Blueprint("text", __name__)


@bp.before_request
def _body_limit() -> None:
    limit_body(services().settings.max_text_bytes)


@bp.post("/predict/text")
@api_spec.validate(tags=["predict"], operation_id="predictText", resp=Response(
    HTTP_200=(TextPrediction, "Scored and stored"),
    HTTP_413=(ErrorBody, "Over MAX_TEXT_BYTES, TEXT_MAX_CHARS (reason too_many_characters) or TEXT_MAX_TOKENS "
                         "(reason too_many_tokens)"),
    HTTP_422=(ErrorBody, "Too short (reason too_short: fewer than TEXT_MIN_TOKENS tokens; the message and "
                         "`minimum_tokens` say how many are needed), or a file that is not UTF-8 text"),
    HTTP_503=(ErrorBody, "The text detector is unavailable (a model is missing: `missing` names it; or still "
                         "loading), or the database or object store is; see Retry-After")))
def predict_text(query: TextParams, json: TextBody, form: TextFile) -> ViewResult:
    """Predict text: machine-written or human, by Fast-DetectGPT

    Send JSON {"text": "..."} or a UTF-8 file in the multipart field `file`. Zero-shot conditional
    probability curvature (Bao et al., ICLR 2024) with a sampling and a scoring causal LM;
    texts longer than the models' context are scored in chunks and pooled.
    """
    svc = services()
    if json is not None:
        svc.texts.check_json_size(request.content_length)
        text, filename, threshold = json.text, None, json.threshold
    elif form is not None:
        text, filename, threshold = svc.texts.read_file(form.file.stream), form.file.filename, None
    else:
        raise InvalidInput("send JSON {\"text\": ...} or multipart/form-data with a 'file' part", parameter="text")
    if query.threshold is not None:
        threshold = query.threshold
    body = absolute_links(svc.texts.predict(text, threshold, current_caller().owner, filename))
    if not svc.detectors.get("text").trained:
        body["warning"] = UNTRAINED_WARNING
    return jsonify(body)
