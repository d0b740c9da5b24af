"""Reading past predictions: GET /predictions, /predictions/stats, /predictions/<id>."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.auth import current_caller
from api.context import services
from api.openapi import Response, ViewResult, api_spec
from api.routes.common import absolute_links
from api.schemas import AnyPrediction, ErrorBody, PredictionList, PredictionQuery, Stats, TimeRange
from api.services.predictions import serialize_prediction
from api.services.queries import Filters, apply_cursor

bp = Blueprint("predictions", __name__)
UNAVAILABLE = (ErrorBody, "The database is unavailable; see Retry-After")


def _public(row, detail: bool = False) -> dict:
    svc = services()
    body = serialize_prediction(row, svc.store, svc.settings)
    if detail and row.media_type == "video":  # frames, progress, aggregates, timeline
        body.update(svc.videos.detail(row))
    elif detail and row.media_type == "audio":  # windows, progress, aggregates, timeline
        body.update(svc.audio.detail(row))
    elif detail and row.media_type == "text":  # criterion, chunks
        body.update(svc.texts.detail(row))
    return absolute_links(body)


@bp.get("/predictions")
@api_spec.validate(tags=["query"], operation_id="listPredictions", resp=Response(
    HTTP_200=(PredictionList, "A page, newest first"), HTTP_503=UNAVAILABLE))
def list_predictions(query: PredictionQuery) -> ViewResult:
    """List past predictions, newest first"""
    filters = Filters(prediction=query.prediction, media_type=query.media_type, status=query.status,
                      since=query.since, until=query.until, min_probability=query.min_probability,
                      max_probability=query.max_probability, sha256=query.sha256.lower() if query.sha256 else None,
                      filename=query.filename, declared_ai=query.declared_ai, c2pa=query.c2pa)
    filters, limit = apply_cursor(filters, query.limit, query.cursor)  # a cursor carries its listing's filters
    caller = current_caller()
    rows, total, next_cursor = services().queries.list(filters, limit, query.offset, query.cursor,
                                                       caller.owner, caller.is_admin)
    return jsonify({"total": total, "count": len(rows), "limit": limit,
                    "offset": None if query.cursor else query.offset, "next_cursor": next_cursor,
                    "results": [_public(row) for row in rows]})


@bp.get("/predictions/stats")
@api_spec.validate(tags=["query"], operation_id="getPredictionStats", resp=Response(
    HTTP_200=(Stats, "Statistics over the range (default: the last 30 days)"), HTTP_503=UNAVAILABLE))
def prediction_stats(query: TimeRange) -> ViewResult:
    """Totals, per-day counts, mean probability, processing time"""
    caller = current_caller()
    return jsonify(services().queries.stats(query.since, query.until, caller.owner, caller.is_admin))


@bp.get("/predictions/<prediction_id>")
@api_spec.validate(tags=["query"], operation_id="getPrediction", resp=Response(
    HTTP_200=(AnyPrediction, "The record with a fresh result_url (a video's or a recording's also its frames or "
                             "windows and progress, a text's its criterion)"),
    HTTP_404=(ErrorBody, "Unknown id, or another owner's"), HTTP_503=UNAVAILABLE))
def get_prediction(prediction_id: str) -> ViewResult:
    """One prediction"""
    caller = current_caller()
    row = services().queries.get(prediction_id, caller.owner, caller.is_admin)
    return jsonify(_public(row, detail=True))
