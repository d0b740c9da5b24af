"""The HTTP boundary for errors: every error leaves as JSON {"error": {"code", "message", ...}}.

Each kind of `api.exceptions.ServiceError` is mapped to its status here and nowhere else: an
outside system that is down (`DatabaseUnavailable`, `StoreUnavailable`, any `Unavailable`) is a
503 with Retry-After, its cause logged; any other exception is a 500, logged with its traceback
and the request id (api/request_log.py puts the id on every line logged while serving).
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from api import exceptions as service_errors

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[service_errors.ServiceError], int] = {
    service_errors.InvalidInput: 400,
    service_errors.NotFound: 404,
    service_errors.PayloadTooLarge: 413,
    service_errors.UnsupportedMediaType: 415,
    service_errors.UnprocessableMedia: 422,
    service_errors.TooManyJobs: 429,
    service_errors.Unavailable: 503,
}


def status_for(exc: service_errors.ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 400


def error_body(code: str, message: str, **details: object) -> dict:
    error = {"code": code, "message": message}
    error.update({k: v for k, v in details.items() if v is not None})
    return {"error": error}


def error_response(status: int, code: str, message: str, headers: dict | None = None,
                   **details: object) -> Response:
    response = jsonify(error_body(code, message, **details))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def service_error_response(exc: service_errors.ServiceError) -> Response:
    headers = {}
    if isinstance(exc, service_errors.Unavailable):
        headers["Retry-After"] = str(exc.retry_after)
        cause = exc.__cause__
        log.warning("%s: %s%s", type(exc).__name__, exc.message,
                    f" ({type(cause).__name__}: {cause})" if cause is not None else "")
    return error_response(status_for(exc), exc.code, exc.message, headers, **exc.details)


def init_app(app: Flask) -> None:
    @app.errorhandler(service_errors.ServiceError)
    def _service_error(exc: service_errors.ServiceError):
        return service_error_response(exc)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        details = {}
        if exc.code == 413 and exc.description == RequestEntityTooLarge.description:  # the body limit
            limit = request.max_content_length
            details["limit_bytes"] = limit
            message = (f"request body is larger than this endpoint's limit of {limit} bytes "
                       f"({limit / 2**20:.1f} MiB)" if limit else "request body is too large")
        response = error_response(exc.code or 500, code, message, **details)
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # Logged with the cause; the client sees no stack trace.
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; it has been logged")
