"""Request helpers shared by the blueprints."""

from __future__ import annotations

from flask import request

LINK_FIELDS = ("result_url", "timeline_url")


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
