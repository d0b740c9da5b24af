"""POST /predict/video and GET /predictions/<id>/timeline.png; video detail for GET /predictions/<id>."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for

from api import UNTRAINED_WARNING
from api.context import services
from api.openapi import PROBABILITY, UNAVAILABLE, error, json_content, ref, register_paths
from api.routes.common import absolute_url, current_caller, parse_threshold
from api.services.errors import InvalidInput

bp = Blueprint("video", __name__)

MULTIPART_OVERHEAD = 64 * 1024


def _absolute(body: dict) -> dict:
    for name in ("result_url", "timeline_url"):
        if name in body:
            body[name] = absolute_url(body[name])
    return body


def prediction_detail(row) -> dict:
    """The `prediction_detail` hook of GET /predictions/<id>: frames, progress, aggregates, timeline."""
    return _absolute(services().videos.detail(row))


@bp.record_once
def _attach_detail_hook(state) -> None:
    state.app.extensions["d3"].extra["prediction_detail"] = prediction_detail


@bp.post("/predict/video")
def predict_video():
    svc = services()
    videos = svc.videos
    request.max_content_length = svc.settings.max_video_bytes + MULTIPART_OVERHEAD
    threshold = parse_threshold(svc.settings.default_threshold)
    params = videos.parse_params(request.values, threshold)
    storage = request.files.get("file")
    if storage is None:
        raise InvalidInput("multipart field 'file' is required", parameter="file")
    upload = videos.spool(storage.stream, storage.filename)
    try:
        status, body = videos.submit(upload, params, current_caller().owner, base_url=request.host_url)
    finally:
        upload.remove()  # every path, errors included: the job keeps its own copy in the object store
    _absolute(body)
    if not svc.engine.trained:
        body["warning"] = UNTRAINED_WARNING
    if status == 202:
        status_url = url_for("predictions.get_prediction", prediction_id=body["id"], _external=True)
        body["status_url"] = status_url
        response = jsonify(body)
        response.status_code = 202
        response.headers["Location"] = status_url
        return response
    return jsonify(body)


@bp.get("/predictions/<prediction_id>/timeline.png")
def timeline(prediction_id: str):
    caller = current_caller()
    svc = services()
    row = svc.queries.get(prediction_id, caller.owner, caller.is_admin)  # another owner's id: 404
    png = svc.videos.timeline_png(row)
    return Response(png, content_type="image/png", headers={"Cache-Control": "private, max-age=300"})


# -- OpenAPI ------------------------------------------------------------------------------------------
_FRAME = {"type": "object", "required": ["index", "timestamp_s", "fake_probability"], "properties": {
    "index": {"type": "integer", "description": "Frame number in the video (0-based, decoding order)."},
    "timestamp_s": {"type": "number", "description": "index / fps."},
    "fake_probability": PROBABILITY}}
_SEGMENT = {"type": "object", "properties": {
    "start_s": {"type": "number", "description": "Start of the first frame's slice of the video."},
    "end_s": {"type": "number", "description": "End of the last frame's slice of the video."},
    "start_frame": {"type": "integer"}, "end_frame": {"type": "integer"},
    "first_timestamp_s": {"type": "number"}, "last_timestamp_s": {"type": "number"},
    "frames": {"type": "integer", "description": "Sampled frames in the run."},
    "mean_probability": PROBABILITY, "max_probability": PROBABILITY}}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}

_SCHEMAS = {
    "VideoFrame": _FRAME,
    "VideoSegment": _SEGMENT,
    "VideoPrediction": {"allOf": [ref("Prediction"), {"type": "object", "properties": {
        "aggregation": {"type": "string", "enum": ["mean", "vote", "max"]},
        "aggregates": {"type": "object", "nullable": True, "description": "All three, whatever was chosen.",
                       "properties": {"mean": PROBABILITY, "vote": PROBABILITY, "max": PROBABILITY}},
        "frames_analyzed": {"type": "integer", "nullable": True},
        "duration_s": _NULLABLE_NUMBER, "fps": _NULLABLE_NUMBER,
        "frame_count": {"type": "integer", "nullable": True},
        "codec": {"type": "string", "nullable": True}, "container": {"type": "string", "nullable": True},
        "sampling": {"type": "object", "nullable": True,
                     "description": "mode (frames|fps), requested_frames, planned_frames, capped, rule."},
        "decoding": {"type": "object", "nullable": True,
                     "description": "strategy, seeks, grabs, skipped_frames, decode_s."},
        "progress": {"type": "object", "properties": {"done": {"type": "integer"}, "total": {"type": "integer"}}},
        "top_frames": {"type": "array", "nullable": True, "items": ref("VideoFrame"),
                       "description": "The 5 most suspicious frames, highest first."},
        "segments": {"type": "array", "nullable": True, "items": ref("VideoSegment"),
                     "description": "Runs of consecutive sampled frames over the threshold."},
        "frames": {"type": "array", "nullable": True, "items": ref("VideoFrame")},
        "timeline_url": {"type": "string", "nullable": True,
                         "description": "Signed link to the timeline PNG (like result_url)."},
        "timings_ms": {"type": "object", "description": "probe, decode, preprocess, inference (sync only)."},
        "status_url": {"type": "string", "description": "Async only: poll it (GET /predictions/{id})."},
        "callback": {"type": "object", "properties": {"url": {"type": "string"}, "status": {"type": "string"}}},
    }}]},
}

_FORM_FIELDS = {
    "file": {"type": "string", "format": "binary",
             "description": "The video. Its type is read from the content (MP4/MOV, AVI, WebM/Matroska, "
                            "MPEG-TS/PS, FLV, Ogg, ASF), never from the filename."},
    "frames": {"type": "integer", "minimum": 1,
               "description": "Frames to sample (default DEFAULT_VIDEO_FRAMES = 32, at most MAX_VIDEO_FRAMES = "
                              "256): the centre frame of each of n equal slices, "
                              "index_i = floor((i + 0.5) * frame_count / n). Not with fps."},
    "fps": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1000,
            "description": "Sample rate instead of a count: floor(duration * fps) frames (at least 1, "
                           "capped at MAX_VIDEO_FRAMES), placed the same way. Not with frames."},
    "threshold": PROBABILITY,
    "aggregation": {"type": "string", "enum": ["mean", "vote", "max"],
                    "description": "mean of frame probabilities (default), vote = share of frames over the "
                                   "threshold, or max; the verdict is fake when it exceeds the threshold."},
    "async": {"type": "boolean", "description": "Queue a job and answer 202 at once. Also automatic above "
                                                "VIDEO_ASYNC_BYTES or VIDEO_ASYNC_SECONDS."},
    "callback_url": {"type": "string", "format": "uri",
                     "description": "POSTed the final result (the GET /predictions/{id} body) when the job "
                                    "ends, with retries. https only unless CALLBACK_ALLOW_HTTP; hosts that "
                                    "resolve to private, loopback, link-local or reserved addresses are "
                                    "refused unless CALLBACK_ALLOW_PRIVATE. Implies async."},
}


def _query(name: str) -> dict:
    schema = dict(_FORM_FIELDS[name])
    description = schema.pop("description", "")
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description + " May also be sent as a form field."}


register_paths({
    "/predict/video": {"post": {
        "summary": "Predict a video: sampled frames, aggregates, fake segments, timeline", "tags": ["predict"],
        "description": "Sync for short videos (200 with the result); async (202 + Location) with async=true, "
                       "callback_url, or over VIDEO_ASYNC_BYTES / VIDEO_ASYNC_SECONDS. Frames are decoded in a "
                       "child process with VIDEO_DECODE_TIMEOUT_S and VIDEO_DECODE_MEMORY_MB limits.",
        "parameters": [_query(name) for name in ("frames", "fps", "threshold", "aggregation", "async",
                                                 "callback_url")],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"], "properties": _FORM_FIELDS}}}},
        "responses": {
            "200": {"description": "Analysed and stored", "content": json_content(ref("VideoPrediction"))},
            "202": {"description": "Queued as a job; poll status_url (also the Location header)",
                    "headers": {"Location": {"schema": {"type": "string"},
                                             "description": "GET /predictions/{id} of the job"}},
                    "content": json_content(ref("VideoPrediction"))},
            "400": error("Missing 'file' field, or a bad parameter (frames, fps, both, threshold, aggregation, "
                         "async, callback_url refused); the error names the parameter"),
            "413": error("Upload over MAX_VIDEO_BYTES, video longer than MAX_VIDEO_SECONDS (reason too_long), or "
                         "frames over MAX_IMAGE_PIXELS (reason too_many_pixels)"),
            "422": error("Not usable as a video; `reason` says which: empty (0 bytes), image (an image was "
                         "sent), not_video (unknown content), undecodable (truncated/corrupt/unsupported codec), "
                         "no_frames, no_fps (no usable frame rate), timeout (decoding exceeded "
                         "VIDEO_DECODE_TIMEOUT_S), memory (exceeded VIDEO_DECODE_MEMORY_MB), crashed"),
            "429": error("Too many queued/running video jobs for this caller (VIDEO_JOBS_PER_KEY), or rate "
                         "limited (RATE_LIMIT_VIDEO)"),
            "503": UNAVAILABLE}}},
    "/predictions/{prediction_id}/timeline.png": {"get": {
        "summary": "Timeline picture of a video prediction", "tags": ["query"],
        "description": "Fake probability of every sampled frame over time, the threshold line and the fake "
                       "segments shaded (PNG, 1000x320). Only the owner's records.",
        "parameters": [{"name": "prediction_id", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {
            "200": {"description": "The PNG", "content": {"image/png": {"schema": {"type": "string",
                                                                                  "format": "binary"}}}},
            "404": error("Unknown id, another owner's, not a video, or the job is not done yet"),
            "503": UNAVAILABLE}}},
}, _SCHEMAS)
