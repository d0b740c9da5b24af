"""Rate limits (flask-limiter): per API key, or per client IP for anonymous callers.

- RATE_LIMIT_DEFAULT: one budget per caller across the whole API.
- RATE_LIMIT_VIDEO: a second, stricter budget for video uploads (POSTs to the `video` blueprint),
  on top of the default one. Applied here by endpoint name, so route modules carry no limiter code.
- `/health`, `/metrics` and CORS preflights are never limited.
- Counters live in Redis when REDIS_URL is set (shared by every worker and host), else in this
  process's memory. If Redis goes away, limits fall back to per-process memory rather than
  failing requests. Every Redis call has REDIS_TIMEOUT_S and no retries; a guard
  (api/breakers.py) fails calls fast once Redis is seen failing, and the background prober
  (api/health_probe.py) switches the limiter to memory when Redis goes down and back to Redis
  as soon as it answers again (flask-limiter alone re-checks on a back-off of up to 32 s, each
  check a blocking call in a request thread).
- Over the limit: 429 JSON with Retry-After (seconds).

The client IP is `request.remote_addr` after ProxyFix(x_for=1) in create_app: the app trusts
exactly one proxy hop (nginx on the same host), so X-Forwarded-For cannot be spoofed past it.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits import parse_many
from limits.storage import RedisStorage

from api.auth import current_caller
from api.breakers import Guard
from api.config import ConfigError, Settings
from api.errors import error_response
from api.health_probe import HealthProber, redis_check, redis_options

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


class RedisUnavailable(RuntimeError):
    """Redis (rate-limit counters) did not answer; the limiter falls back to memory."""


def _redis_outage(exc: BaseException) -> bool:
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError))


class GuardedRedisStorage(RedisStorage):
    """limits' Redis storage with every call through a guard; `check()` is the prober's verdict."""

    STORAGE_SCHEME = ["d3-redis", "d3-rediss"]  # noqa: RUF012 - limits' registry reads this name

    def __init__(self, uri: str, guard: Guard, healthy: Callable[[], bool | None] | None = None,
                 **options: Any) -> None:
        super().__init__(uri.removeprefix("d3-"), **options)
        self.guard = guard
        self._healthy = healthy  # () -> bool | None, from the prober; None: not probed yet

    def _guarded(self, method, *args, **kwargs):
        with self.guard.call():
            return method(*args, **kwargs)

    def incr(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().incr, *args, **kwargs)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().get, *args, **kwargs)

    def get_expiry(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().get_expiry, *args, **kwargs)

    def clear(self, *args: Any, **kwargs: Any) -> Any:
        return self._guarded(super().clear, *args, **kwargs)

    def check(self) -> bool:
        verdict = self._healthy() if self._healthy is not None else None
        if verdict is not None:
            return verdict  # no network call in the request thread
        try:
            return bool(self._guarded(super().check))
        except RedisUnavailable:
            return False


def build_limiter(settings: Settings, prober: HealthProber | None = None) -> Limiter:
    """The limiter; with REDIS_URL its Redis calls are guarded and `prober` watches Redis."""
    default = _check("RATE_LIMIT_DEFAULT", settings.rate_limit_default)
    video = _check("RATE_LIMIT_VIDEO", settings.rate_limit_video)
    storage_options: dict = {}
    guard = None
    if settings.redis_url:
        guard = Guard("rate-limit Redis", RedisUnavailable, fail_max=settings.breaker_fail_max,
                      max_in_flight=settings.resolved_max_in_flight, is_failure=_redis_outage)
        prober_ref = weakref.ref(prober) if prober is not None else None  # probe threads reach this

        def healthy() -> bool | None:
            current = prober_ref() if prober_ref is not None else None
            verdict = current.verdict("redis") if current is not None else None
            return None if verdict is None else verdict.ok

        # A dead or frozen Redis must cost one short wait, then fail fast, never a hung request.
        storage_options = {**redis_options(settings.redis_timeout_s), "guard": guard, "healthy": healthy}
    limiter = Limiter(
        client_identity,
        application_limits=[
            ApplicationLimit(default, scope="api"),
            ApplicationLimit(video, scope="video", exempt_when=lambda: not is_video_upload()),
        ],
        storage_uri=f"d3-{settings.redis_url}" if settings.redis_url else "memory://",
        storage_options=storage_options,
        strategy="fixed-window",
        key_prefix="d3",
        in_memory_fallback_enabled=True,
        swallow_errors=True,
        headers_enabled=False,  # Retry-After is set on 429 below; no per-request storage round trip
    )
    limiter.request_filter(lambda: request.method == "OPTIONS" or request.endpoint in EXEMPT_ENDPOINTS)
    if guard is not None and prober is not None:
        def switch(ok: bool) -> None:
            # flask-limiter's own flag for "use the in-memory fallback" (no public setter).
            limiter._storage_dead = not ok  # noqa: SLF001

        prober.add("redis", redis_check(settings.redis_url, settings.probe_timeout_s), guard=guard,
                   on_change=switch)
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
