"""Every error the service's own code raises: the bottom module, it imports nothing of the project.

Services, utils, database.py and storage.py raise these; api/errors.py (the HTTP boundary) maps
each kind to its status and JSON body, once. An outside system that cannot answer raises a
subclass of `Unavailable` (503 + Retry-After); anything else unexpected is a 500, logged.
"""

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


class TooManyJobs(ServiceError):
    code = "too_many_jobs"


class Unavailable(ServiceError):
    """A dependency (model, database, object store) cannot serve now; retry later."""

    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 5, **details: object) -> None:
        super().__init__(message, **details)
        self.retry_after = retry_after


class DatabaseUnavailable(Unavailable):
    """The database cannot be reached (connection refused, lost, timed out, locked): retry later.

    Only connection-level failures: an integrity error or a bad query is a bug, left to be a 500.
    """

    def __init__(self, message: str = "the database is unavailable; retry shortly", retry_after: int = 5,
                 **details: object) -> None:
        super().__init__(message, retry_after, **details)


class StoreUnavailable(Unavailable):
    """The object store cannot be reached or is overloaded: retry later."""

    def __init__(self, message: str = "the object store is unavailable; retry shortly", retry_after: int = 5,
                 **details: object) -> None:
        super().__init__(message, retry_after, **details)


class InferenceTierUnavailable(Unavailable):
    """The inference tier (D3_INFERENCE_URL) cannot be reached: refused, reset, or no route."""

    def __init__(self, message: str = "the inference tier is unavailable; retry shortly", retry_after: int = 5,
                 **details: object) -> None:
        super().__init__(message, retry_after, **details)


class QueueUnavailable(Unavailable):
    """The video job queue (the Celery broker) cannot take a job now: retry later."""

    def __init__(self, message: str = "the video job queue is unavailable; retry shortly", retry_after: int = 10,
                 **details: object) -> None:
        super().__init__(message, retry_after, **details)
