"""GET /openapi.json and GET /docs (Swagger UI, its assets served by this app: works offline)."""

from __future__ import annotations

from flask import Blueprint, jsonify
from flask_swagger_ui import get_swaggerui_blueprint

from api.context import services
from api.openapi import build_spec

bp = Blueprint("docs", __name__)
bp.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "D3 API"}))


@bp.get("/openapi.json")
def openapi():
    return jsonify(build_spec(services().settings))
