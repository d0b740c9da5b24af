"""GET /objects/<bucket>/<key>: signed links into the local-folder object store (no MinIO)."""

from __future__ import annotations

import mimetypes

from flask import Blueprint, Response, request

from api.context import services
from api.exceptions import NotFound
from api.storage import LocalObjectStore, ObjectNotFound

bp = Blueprint("objects", __name__)


@bp.get("/objects/<bucket>/<path:key>")
def get_object(bucket: str, key: str):
    store = services().store
    if not isinstance(store, LocalObjectStore):
        raise NotFound("no such object")
    if not store.verify_signature(bucket, key, request.args.get("expires"), request.args.get("signature")):
        # Bad, expired or missing signature: same answer as a missing object, nothing to probe.
        raise NotFound("no such object, or the link has expired")
    try:
        data = store.get_bytes(bucket, key)
    except (ObjectNotFound, ValueError):
        raise NotFound("no such object") from None
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(data, content_type=content_type, headers={"Cache-Control": "private, max-age=60"})
