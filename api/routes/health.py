"""GET /health: liveness and readiness in one cheap body (no model forward)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.auth import current_caller
from api.context import services
from api.detector.config import UNTRAINED_WARNING
from api.openapi import Response, api_spec
from api.schemas import Health

bp = Blueprint("health", __name__)


@bp.get("/health")
@api_spec.validate(tags=["service"], operation_id="getHealth", resp=Response(
    HTTP_200=(Health, "Ready"), HTTP_503=(Health, "Not ready (model loading, database or object store down)")))
def health():
    """Liveness and readiness"""
    svc = services()
    model = svc.engine.describe()
    database_ok = svc.db.ping()
    store_ok = svc.store.ping()
    ready = bool(model.get("ready")) and database_ok and store_ok
    body = {
        "status": "ok" if ready else "unavailable",
        "ready": ready,
        "model": model,
        "database": {"reachable": database_ok, "backend": svc.db.backend},
        "object_store": {"reachable": store_ok, "kind": "minio" if svc.settings.uses_minio else "local"},
        "queue_depth": svc.engine.stats().get("queue_depth", 0),
    }
    if model.get("ready") and not model.get("trained", True):
        body["warning"] = UNTRAINED_WARNING
    if svc.settings.auth_required and current_caller().owner is None:
        # Public summary only: the details (model, backends, queue) need a key.
        body = {k: body[k] for k in ("status", "ready")}
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    if not ready:
        response.headers["Retry-After"] = "10"
    return response
