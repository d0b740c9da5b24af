"""Structured logs: one JSON line per request, JSON for every other line of the app, secrets scrubbed.

Each request gets an id: the client's (or nginx's) `X-Request-ID` when it is short and made of
safe characters, else a fresh one; it is returned in the response header of the same name. The
request line carries the caller's key *name* (never the key), endpoint, status, duration, media
type, verdict, and for errors their code and message (our own text: never file contents).
An unhandled exception is logged by api/errors.py with its traceback; that line carries the same
request id. Anything key-shaped and every configured secret value is
replaced by `***` in every line this formatter writes, whatever logged it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, g, has_request_context, request

from api.auth import current_caller
from api.config import SECRET_MIN_LENGTH, Settings
from api.detector.timing import model_time_ms, reset_model_time
from api.metrics import prediction_results
from api.services.keys import KEY_LIKE

HEADER = "X-Request-ID"
# The same rule as d3-api-nginx.conf, so an id nginx passed on is kept as it is.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")

MEDIA_BY_BLUEPRINT = {"predict": "image", "video": "video"}  # for requests that produced no verdict

log = logging.getLogger("d3.request")


class Redactor:
    """Replaces API keys and configured secret values in log text."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add_settings(self, settings: Settings) -> None:
        for value in settings.secret_values():
            self._add(value)
        for url in (settings.database_url, settings.redis_url, settings.celery_broker_url.get_secret_value()):
            with contextlib.suppress(ValueError):  # not a URL: nothing to scrub
                self._add(urlsplit(url).password or "")

    def _add(self, value: str) -> None:
        if value and len(value) >= SECRET_MIN_LENGTH:  # the secret policy (api/config.py)
            self._secrets.add(value)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            value = KEY_LIKE.sub("***", value)
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, "***")
            return value
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


REDACT = Redactor()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the record's `fields`, exc.

    Hand-written rather than python-json-logger's: every value passes through the Redactor (keys,
    passwords, signed URLs) before it is written, and the whole formatter is a screenful.
    """

    def __init__(self, redactor: Redactor = REDACT) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id_ = getattr(record, "request_id", None)
        if request_id_:  # lines logged while serving a request (an error's cause) carry its id
            entry["request_id"] = request_id_
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(self.redactor(entry), default=str)


def request_id() -> str:
    return g.get("request_id") or ""


def _incoming_id() -> str:
    raw = request.headers.get(HEADER, "")
    return raw if _SAFE_ID.match(raw) else uuid.uuid4().hex


_factory_installed = False


def use_json_logging() -> None:
    """JSON on the plain stream handler logging.basicConfig made (Gunicorn workers, `flask run`),
    and every record made while serving a request remembers that request's id. Idempotent.
    Test runners' capture handlers are subclasses and keep their own format."""
    global _factory_installed
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())
    if not _factory_installed:
        _factory_installed = True
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if has_request_context():
                record.request_id = g.get("request_id")
            return record

        logging.setLogRecordFactory(factory)


def _verdict(results: list[dict[str, Any]]) -> Any:
    if not results:
        return None
    if len(results) == 1 and request.endpoint != "predict.predict_batch":
        return results[0]["label"]
    counts = {"fake": 0, "real": 0}
    for result in results:
        counts[result["label"]] += 1
    return counts


def request_fields(response: Response, duration_ms: float) -> dict[str, Any]:
    caller = current_caller()
    results = prediction_results(response)
    fields: dict[str, Any] = {
        "request_id": request_id(),
        "method": request.method,
        "path": request.path,  # never the query string: signed links carry their signature there
        "endpoint": request.endpoint,
        "status": response.status_code,
        "duration_ms": round(duration_ms, 2),
        "key": caller.name,
        "key_id": caller.owner,
        "client": request.remote_addr,
        "bytes_in": request.content_length,
        "media_type": results[0]["media_type"] if results else MEDIA_BY_BLUEPRINT.get(request.blueprint or ""),
        "verdict": _verdict(results),
    }
    model_ms = model_time_ms()
    if model_ms:  # the part of duration_ms spent waiting on the model (queue, batch window, forward)
        fields["model_ms"] = round(model_ms, 2)
    if response.status_code >= 400 and response.is_json:
        body = response.get_json(silent=True)
        problem = body.get("error") if isinstance(body, dict) else None
        if isinstance(problem, dict):
            fields["error"] = {"code": problem.get("code"), "message": problem.get("message")}
    return fields


def init_app(app: Flask) -> None:
    REDACT.add_settings(app.config["SETTINGS"])
    use_json_logging()

    @app.before_request
    def _begin() -> None:
        g._d3_log_started = time.perf_counter()
        g.request_id = _incoming_id()
        reset_model_time()

    @app.after_request
    def _finish(response: Response) -> Response:
        if not g.get("request_id"):  # a hook before ours answered early
            g.request_id = _incoming_id()
        response.headers[HEADER] = g.request_id
        started = g.get("_d3_log_started")
        duration_ms = (time.perf_counter() - started) * 1000.0 if started is not None else 0.0
        fields = request_fields(response, duration_ms)
        # 503 is "busy or loading, retry": expected while starting; other 5xx are bugs or outages.
        status = response.status_code
        level = logging.WARNING if status == 503 else logging.ERROR if status >= 500 else logging.INFO
        log.log(level, "%s %s %s %.1fms", request.method, request.path, response.status_code, duration_ms,
                extra={"fields": fields})
        return response
