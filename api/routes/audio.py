"""POST /predict/audio: a recording in, AASIST's verdict per window and overall out."""

from __future__ import annotations

from flask import Blueprint, request

from api.auth import current_caller
from api.context import services
from api.exceptions import InvalidInput
from api.openapi import Response, ViewResult, api_spec
from api.routes.common import limit_body, media_response
from api.schemas import AudioFile, AudioParams, AudioPrediction, ErrorBody

bp = Blueprint("audio", __name__)


@bp.before_request
def _body_limit() -> None:
    limit_body(services().settings.max_audio_bytes)


@bp.post("/predict/audio")
@api_spec.validate(tags=["predict"], operation_id="predictAudio", resp=Response(
    HTTP_200=(AudioPrediction, "Analysed and stored"),
    HTTP_202=(AudioPrediction, "Queued as a job; poll status_url (also the Location header)"),
    HTTP_413=(ErrorBody, "Upload over MAX_AUDIO_BYTES, or recording longer than MAX_AUDIO_SECONDS (reason too_long)"),
    HTTP_422=(ErrorBody, "Not usable as audio; `reason` says which: empty, image, not_audio, undecodable, "
                         "no_audio (no audio track), timeout (VIDEO_DECODE_TIMEOUT_S), memory "
                         "(VIDEO_DECODE_MEMORY_MB), crashed"),
    HTTP_503=(ErrorBody, "The speech detector is unavailable (its weights are missing: `missing` names the file; "
                         "or still loading), or the database or object store is; see Retry-After")))
def predict_audio(query: AudioParams, form: AudioFile) -> ViewResult:
    """Predict speech: synthetic or bona fide, per 4-second window and overall

    AASIST (Jung et al., ICASSP 2022) on the raw 16 kHz waveform, 64,600-sample windows every
    AUDIO_HOP_SECONDS; per-window scores, mean/vote/max aggregates, fake segments and a timeline picture.
    Decoded in a child process with VIDEO_DECODE_TIMEOUT_S and VIDEO_DECODE_MEMORY_MB limits.
    """
    if form is None:
        raise InvalidInput("send multipart/form-data with a 'file' part", parameter="file")
    svc = services()
    params = svc.audio.params(query.threshold, query.aggregation, query.run_async)
    upload = svc.audio.spool(form.file.stream, form.file.filename)
    try:
        submission = svc.audio.submit(upload, params, current_caller().owner, base_url=request.host_url)
    finally:
        upload.remove()  # a job keeps its own copy in the object store
    return media_response(submission, svc.detectors.get("audio").trained)
