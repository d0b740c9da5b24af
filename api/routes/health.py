"""GET /health: liveness and readiness in one cheap body, from the background prober's verdicts.

No I/O here (api/services/health.py): /health answers at once even while an outside system hangs,
and says which one is down and since when.
"""

from __future__ import annotations

from flask import Blueprint, jsonify

from api.auth import current_caller
from api.context import services
from api.openapi import Response, ViewResult, api_spec
from api.schemas import Health
from api.services.health import health_report

bp = Blueprint("health", __name__)


@bp.get("/health")
@api_spec.validate(tags=["service"], operation_id="getHealth", resp=Response(
    HTTP_200=(Health, "Ready"), HTTP_503=(Health, "Not ready (model loading, database or object store down)")))
def health() -> ViewResult:
    """Liveness and readiness"""
    svc = services()
    report = health_report(svc.engine, svc.detectors, svc.prober, svc.db.backend,
                           "minio" if svc.settings.uses_minio else "local")
    public = svc.settings.auth_required and current_caller().owner is None
    response = jsonify(report.public() if public else report.body)
    response.status_code = 200 if report.ready else 503
    if report.retry_after_s is not None:
        response.headers["Retry-After"] = str(report.retry_after_s)
    return response
