"""POST /predict/video and GET /predictions/<id>/timeline.png."""

from __future__ import annotations

from flask import Blueprint, Response, request, url_for

from api.auth import current_caller
from api.context import Services, services
from api.errors import error_body, status_for
from api.exceptions import InvalidInput, ServiceError
from api.openapi import Response as Responses
from api.openapi import ViewResult, api_spec, produces, response_header
from api.routes.common import absolute_links, limit_body, media_response
from api.schemas import ErrorBody, VideoFile, VideoParams, VideoWithAudio
from api.services.videos import SpooledUpload

bp = Blueprint("video", __name__)


@bp.before_request
def _body_limit() -> None:
    limit_body(services().settings.max_video_bytes)


@bp.post("/predict/video")
@response_header(202, "Location", "GET /predictions/{id} of the job")
@api_spec.validate(tags=["predict"], operation_id="predictVideo", resp=Responses(
    HTTP_200=(VideoWithAudio, "Analysed and stored"),
    HTTP_202=(VideoWithAudio, "Queued as a job; poll status_url (also the Location header)"),
    HTTP_413=(ErrorBody, "Upload over MAX_VIDEO_BYTES, video longer than MAX_VIDEO_SECONDS (reason too_long), or "
                         "frames over MAX_IMAGE_PIXELS (reason too_many_pixels)"),
    HTTP_422=(ErrorBody, "Not usable as a video; `reason` says which: empty, image, not_video, undecodable, "
                         "no_frames, no_fps, timeout (VIDEO_DECODE_TIMEOUT_S), memory (VIDEO_DECODE_MEMORY_MB), "
                         "crashed"),
    HTTP_429=(ErrorBody, "Too many queued/running video jobs for this caller (VIDEO_JOBS_PER_KEY), or rate "
                         "limited (RATE_LIMIT_VIDEO)"),
    HTTP_503=(ErrorBody, "Model, database, object store or (async) the job queue unavailable; see Retry-After")))
def predict_video(query: VideoParams, form: VideoFile) -> ViewResult:
    """Predict a video: sampled frames, aggregates, fake segments, timeline

    Sync for short videos (200 with the result); async (202 + Location) with async=true, callback_url,
    or over VIDEO_ASYNC_BYTES / VIDEO_ASYNC_SECONDS. Frames are decoded in a child process with
    VIDEO_DECODE_TIMEOUT_S and VIDEO_DECODE_MEMORY_MB limits.
    """
    if form is None:
        raise InvalidInput("send multipart/form-data with a 'file' part", parameter="file")
    svc = services()
    params = svc.videos.parse_params(query.threshold, query.frames, query.fps, query.aggregation, query.run_async,
                                     query.callback_url)
    upload = svc.videos.spool(form.file.stream, form.file.filename)
    try:
        submission = svc.videos.submit(upload, params, current_caller().owner, base_url=request.host_url)
        if query.audio:
            submission.body["audio"] = _soundtrack(svc, upload, query.threshold, query.aggregation, submission.queued)
    finally:
        upload.remove()  # every path, errors included: the job keeps its own copy in the object store
    return media_response(submission, svc.engine.trained)


def _soundtrack(svc: Services, upload: SpooledUpload, threshold: float | None, aggregation: str,
                queued: bool) -> dict:
    """The soundtrack's own audio prediction beside the frames' verdict; its failure (no audio track,
    the speech detector unavailable) is reported there, the video's result stands."""
    try:
        submission = svc.audio.submit(upload, svc.audio.params(threshold, aggregation, queued),
                                      current_caller().owner, base_url=request.host_url)
    except ServiceError as exc:
        return {"status_code": status_for(exc), **error_body(exc.code, exc.message, **exc.details)}
    body = absolute_links(submission.body)
    if submission.queued:
        body["status_url"] = url_for("predictions.get_prediction", prediction_id=body["id"], _external=True)
    return body


@bp.get("/predictions/<prediction_id>/timeline.png")
@produces(200, "image/png")
@api_spec.validate(tags=["query"], operation_id="getTimeline", resp=Responses(
    HTTP_200=(None, "The PNG"),
    HTTP_404=(ErrorBody, "Unknown id, another owner's, not a video or audio, or the job is not done yet"),
    HTTP_503=(ErrorBody, "The database or object store is unavailable; see Retry-After")))
def timeline(prediction_id: str) -> ViewResult:
    """Timeline picture of a video or audio prediction

    Fake probability of every sampled frame (video) or scoring window (audio) over time, the
    threshold line and the fake segments shaded (PNG, 1000x320). Only the owner's records.
    """
    caller = current_caller()
    svc = services()
    row = svc.queries.get(prediction_id, caller.owner, caller.is_admin)  # another owner's id: 404
    png = svc.audio.timeline_png(row) if row.media_type == "audio" else svc.videos.timeline_png(row)
    return Response(png, content_type="image/png", headers={"Cache-Control": "private, max-age=300"})
