"""Errors services raise; api/errors.py turns each kind into its HTTP status and JSON body."""

from __future__ import annotations


class ServiceError(Exception):
    """Base: `code` is a stable machine-readable name, the message is for people."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidInput(ServiceError):
    code = "invalid_input"


class NotFound(ServiceError):
    code = "not_found"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class UnprocessableMedia(ServiceError):
    code = "unprocessable_media"


class Unavailable(ServiceError):
    """A dependency (model, database, object store) cannot serve now; retry later."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 5, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class TooManyJobs(ServiceError):
    code = "too_many_jobs"
