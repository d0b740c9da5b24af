"""Model versions: GET /models, GET /models/active; admins: PUT /models/active, POST /models."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from api.auth import current_caller
from api.context import services
from api.errors import error_response
from api.exceptions import InvalidInput
from api.openapi import Response, ViewResult, api_spec
from api.schemas import (
    ActivateModel,
    ActiveModelInfo,
    ErrorBody,
    ModelUpload,
    ModelUploadParams,
    ModelVersionInfo,
    ModelVersionList,
)
from api.services.model_versions import MAX_HEAD_BYTES, parse_card

bp = Blueprint("model_versions", __name__)

MAX_CARD_BYTES = 1024 * 1024
UNAVAILABLE = (ErrorBody, "The database or object store is unavailable; see Retry-After")
FORBIDDEN = (ErrorBody, "A key that is not an admin key")


@bp.before_request
def _admins_change_and_body_limit():
    # Before the schema reads the body: a caller who may not change versions gets its 403 without
    # the server parsing tens of megabytes first.
    if request.method not in ("GET", "HEAD", "OPTIONS") and not current_caller().is_admin:
        return error_response(403, "forbidden", "changing model versions needs an admin key")
    request.max_content_length = MAX_HEAD_BYTES + MAX_CARD_BYTES + 64 * 1024
    return None


@bp.get("/models")
@api_spec.validate(tags=["models"], operation_id="listModelVersions", resp=Response(
    HTTP_200=(ModelVersionList, "Every stored version, newest first, with its card's summary"),
    HTTP_503=UNAVAILABLE))
def list_models() -> ViewResult:
    """List the model versions (heads) the service can switch between"""
    versions = services().model_versions.list()
    return jsonify({"active": next((v["version"] for v in versions if v["active"]), None), "versions": versions})


@bp.get("/models/active")
@api_spec.validate(tags=["models"], operation_id="getActiveModel", resp=Response(
    HTTP_200=(ActiveModelInfo, "The head that scores a request sent now, and its default threshold"),
    HTTP_503=UNAVAILABLE))
def get_active_model() -> ViewResult:
    """What answers now: version, model_version, trained, default threshold"""
    svc = services()
    return jsonify(svc.model_versions.active_view(svc.engine))


@bp.put("/models/active")
@api_spec.validate(tags=["models"], operation_id="activateModelVersion", resp=Response(
    HTTP_200=(ActiveModelInfo, "Activated; every serving process follows within MODEL_VERSION_POLL_S"),
    HTTP_400=(ErrorBody, "No version named, or an ambiguous sha256 prefix"), HTTP_403=FORBIDDEN,
    HTTP_404=(ErrorBody, "No such version"), HTTP_503=UNAVAILABLE))
def activate_model(json: ActivateModel) -> ViewResult:
    """Activate a model version, or go back to the configured head (admin)

    Requests already running keep the head they started with; every later one gets the new one.
    """
    caller = current_caller()  # an admin (checked before the body was read)
    if json is None or (not json.version and not json.default):  # never fall back to the default by accident
        raise InvalidInput('send JSON {"version": "<id or name>"} or {"default": true}', parameter="version")
    if json.default and json.version:
        raise InvalidInput("give either version or default: true, not both", parameter="version")
    svc = services()
    svc.model_versions.activate(None if json.default else json.version, by=caller.name, engine=svc.engine)
    return jsonify(svc.model_versions.active_view(svc.engine))


@bp.post("/models")
@api_spec.validate(tags=["models"], operation_id="addModelVersion", resp=Response(
    HTTP_200=(ModelVersionInfo, "This head was stored already; its card or name was updated"),
    HTTP_201=(ModelVersionInfo, "Stored as a new version (not activated)"),
    HTTP_400=(ErrorBody, "Not a head of the configured backbone (keys, shapes), a bad card or name; nothing "
                         "stored"),
    HTTP_403=FORBIDDEN, HTTP_413=(ErrorBody, "Request body too large"), HTTP_503=UNAVAILABLE))
def add_model(query: ModelUploadParams, form: ModelUpload) -> ViewResult:
    """Add a head (and its model card) as a model version (admin)"""
    if form is None:
        raise InvalidInput("send multipart/form-data with a 'head' file part (and optionally 'card')",
                           parameter="head")
    head = form.head.stream.read(MAX_HEAD_BYTES + 1)
    card = None
    if form.card is not None:
        card = parse_card(form.card.stream.read(MAX_CARD_BYTES + 1))
    body, created = services().model_versions.add(head, card, query.name)
    return jsonify(body), 201 if created else 200
