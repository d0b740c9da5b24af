"""Request parsing shared by the blueprints."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flask import g, request

from api.services.errors import InvalidInput
from api.utils.parsing import bool_param


@dataclass(frozen=True)
class Caller:
    """Who is asking: `owner` scopes what they see (None = anonymous); admins see everything."""

    owner: str | None
    name: str
    is_admin: bool = False


ANONYMOUS = Caller(owner=None, name="anonymous")


def current_caller() -> Caller:
    # Access control (api/auth.py) sets g.caller before the view runs; without it, anonymous.
    return getattr(g, "caller", ANONYMOUS)


def parse_threshold(default: float) -> float:
    raw = request.values.get("threshold")
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"threshold must be a number between 0 and 1, got {raw!r}", parameter="threshold") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidInput(f"threshold must be between 0 and 1, got {raw!r}", parameter="threshold")
    return value


def parse_bool(name: str, default: bool) -> bool:
    return bool_param(name, request.values.get(name), default)


def absolute_url(url: str | None) -> str | None:
    """Local-store links are paths on this API; make them absolute for the client."""
    if url and url.startswith("/"):
        return request.host_url.rstrip("/") + url
    return url
