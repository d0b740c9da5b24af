"""GET /objects/<bucket>/<key>: signed links into the local-folder object store (no MinIO)."""

from __future__ import annotations

import mimetypes

from flask import Blueprint, Response

from api.context import services
from api.exceptions import NotFound
from api.openapi import Response as Responses
from api.openapi import ViewResult, api_spec, produces
from api.schemas import ErrorBody, ObjectLink
from api.storage import LocalObjectStore, ObjectNotFound

bp = Blueprint("objects", __name__)


@bp.get("/objects/<bucket>/<path:key>")
@produces(200, "application/json", "image/png", "application/octet-stream")
@api_spec.validate(tags=["query"], operation_id="getObject", resp=Responses(
    HTTP_200=(None, "The stored object"), HTTP_404=(ErrorBody, "No such object, or the signature is bad or expired")))
def get_object(bucket: str, key: str, query: ObjectLink) -> ViewResult:
    """Signed link into the local object store (only without MinIO)"""
    store = services().store
    if not isinstance(store, LocalObjectStore):
        raise NotFound("no such object")
    try:
        data = store.read_signed(bucket, key, query.expires, query.signature)
    except ObjectNotFound:
        # Bad, expired or missing signature: same answer as a missing object, nothing to probe.
        raise NotFound("no such object, or the link has expired") from None
    content_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return Response(data, content_type=content_type, headers={"Cache-Control": "private, max-age=60"})
