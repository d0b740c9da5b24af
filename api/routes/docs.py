"""GET /openapi.json and GET /docs (Swagger UI, its assets served by this app: works offline)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask_swagger_ui import get_swaggerui_blueprint

from api.context import services
from api.openapi import Response, ViewResult, api_spec, build_spec, produces

bp = Blueprint("docs", __name__)
bp.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "D3 API"}))


@bp.get("/openapi.json")
@produces(200, "application/json", schema={"type": "object"})
@api_spec.validate(tags=["service"], operation_id="getOpenApi", resp=Response(HTTP_200=(None, "OpenAPI 3 document")))
def openapi() -> ViewResult:
    """This document"""
    app = current_app._get_current_object()
    spec = app.extensions.get("d3_openapi")
    if spec is None:  # built once per app, from its routes and its settings
        spec = app.extensions["d3_openapi"] = build_spec(app, services().settings)
    return jsonify(spec)
