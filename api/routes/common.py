"""Request helpers shared by the blueprints."""

from __future__ import annotations

from flask import Response, jsonify, request, url_for

from api.detector.config import UNTRAINED_WARNING
from api.services.series import Submission

LINK_FIELDS = ("result_url", "timeline_url")
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and part headers around the file itself


def limit_body(max_file_bytes: int, files: int = 1) -> None:
    """Before a schema reads the form: the body limit must hold while it is parsed."""
    request.max_content_length = (max_file_bytes + MULTIPART_OVERHEAD) * files


def absolute_url(url: str | None) -> str | None:
    """Local-store links are paths on this API; make them absolute for the client."""
    if url and url.startswith("/"):
        return request.host_url.rstrip("/") + url
    return url


def absolute_links(body: dict) -> dict:
    """The body with its result/timeline links made absolute (in place)."""
    for name in LINK_FIELDS:
        if name in body:
            body[name] = absolute_url(body[name])
    return body


def media_response(submission: Submission, trained: bool) -> Response:
    """200 with the result, or 202 + Location (and status_url) for a queued job; links absolute."""
    body = absolute_links(submission.body)
    if not trained:
        body["warning"] = UNTRAINED_WARNING
    if not submission.queued:
        return jsonify(body)
    body["status_url"] = url_for("predictions.get_prediction", prediction_id=body["id"], _external=True)
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = body["status_url"]
    return response
