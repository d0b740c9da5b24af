"""Rate limits (flask-limiter): per API key, or per client IP for anonymous callers.

- RATE_LIMIT_DEFAULT: one budget per caller across the whole API.
- RATE_LIMIT_VIDEO: a second, stricter budget for video uploads (POSTs to the `video` blueprint),
  on top of the default one. Applied here by endpoint name, so route modules carry no limiter code.
- `/health`, `/metrics` and CORS preflights are never limited.
- Counters live in Redis when REDIS_URL is set (shared by every worker and host), else in this
  process's memory. If Redis goes away, limits fall back to per-process memory rather than
  failing requests.
- Over the limit: 429 JSON with Retry-After (seconds).

The client IP is `request.remote_addr` after ProxyFix(x_for=1) in create_app: the app trusts
exactly one proxy hop (nginx on the same host), so X-Forwarded-For cannot be spoofed past it.
"""

from __future__ import annotations

import math
import time

from flask import Flask, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits import parse_many

from api.auth import current_caller
from api.config import ConfigError, Settings
from api.errors import error_response

EXEMPT_ENDPOINTS = frozenset({"health.health", "metrics.metrics"})
VIDEO_BLUEPRINT = "video"


def client_identity() -> str:
    """The rate-limit bucket owner: the key id when a key was verified, else the client IP."""
    caller = current_caller()
    if caller.owner is not None:
        return f"key:{caller.owner}"
    return f"ip:{request.remote_addr or 'unknown'}"


def is_video_upload() -> bool:
    return request.blueprint == VIDEO_BLUEPRINT and request.method == "POST"


def _check(name: str, value: str) -> str:
    try:
        if not parse_many(value):
            raise ValueError
    except ValueError:
        raise ConfigError(f"{name} must be a rate like '120/minute' or '10 per 30 seconds', got {value!r}") from None
    return value


def build_limiter(settings: Settings) -> Limiter:
    default = _check("RATE_LIMIT_DEFAULT", settings.rate_limit_default)
    video = _check("RATE_LIMIT_VIDEO", settings.rate_limit_video)
    limiter = Limiter(
        client_identity,
        application_limits=[
            ApplicationLimit(default, scope="api"),
            ApplicationLimit(video, scope="video", exempt_when=lambda: not is_video_upload()),
        ],
        storage_uri=settings.redis_url or "memory://",
        # A dead Redis must cost a quick fallback, not a hung request.
        storage_options={"socket_connect_timeout": 2, "socket_timeout": 2} if settings.redis_url else {},
        strategy="fixed-window",
        key_prefix="d3",
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        headers_enabled=False,  # Retry-After is set on 429 below; no per-request storage round trip
    )
    limiter.request_filter(lambda: request.method == "OPTIONS" or request.endpoint in EXEMPT_ENDPOINTS)
    return limiter


def init_app(app: Flask) -> Limiter:
    """Attach after api.auth (the key decides the bucket), so register this hook later."""
    limiter = app.extensions["d3"].limiter
    limiter.init_app(app)

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded):
        current = limiter.current_limit
        retry_after = 1
        if current is not None:
            retry_after = max(1, math.ceil(current.reset_at - time.time()))
        return error_response(429, "rate_limited",
                              f"rate limit exceeded ({exc.description}); retry after {retry_after} s",
                              {"Retry-After": str(retry_after)}, limit=str(exc.description))

    return limiter
