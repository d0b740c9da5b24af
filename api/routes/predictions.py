"""Reading past predictions: GET /predictions, /predictions/stats, /predictions/<id>."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api.auth import current_caller
from api.context import services
from api.routes.common import absolute_links
from api.services.predictions import serialize_prediction
from api.services.queries import DEFAULT_LIMIT, MAX_LIMIT, parse_filters, parse_int, parse_time

bp = Blueprint("predictions", __name__)


def _public(row, detail: bool = False) -> dict:
    svc = services()
    body = serialize_prediction(row, svc.store, svc.settings)
    if detail and row.media_type == "video":  # frames, progress, aggregates, timeline
        body.update(svc.videos.detail(row))
    return absolute_links(body)


@bp.get("/predictions")
def list_predictions():
    args = request.args.to_dict()
    filters = parse_filters(args)
    limit = parse_int("limit", args.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = parse_int("offset", args.get("offset"), 0, 0, 10_000_000)
    cursor = args.get("cursor") or None
    caller = current_caller()
    rows, total, next_cursor = services().queries.list(filters, limit, offset, cursor, caller.owner,
                                                       caller.is_admin)
    return jsonify({"total": total, "count": len(rows), "limit": limit, "offset": None if cursor else offset,
                    "next_cursor": next_cursor, "results": [_public(row) for row in rows]})


@bp.get("/predictions/stats")
def prediction_stats():
    caller = current_caller()
    since = parse_time("since", request.args.get("since"))
    until = parse_time("until", request.args.get("until"))
    return jsonify(services().queries.stats(since, until, caller.owner, caller.is_admin))


@bp.get("/predictions/<prediction_id>")
def get_prediction(prediction_id: str):
    caller = current_caller()
    row = services().queries.get(prediction_id, caller.owner, caller.is_admin)
    return jsonify(_public(row, detail=True))
