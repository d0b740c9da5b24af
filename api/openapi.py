"""The OpenAPI 3 document of the service, built from small pieces so each route's entry stays short.

Other concerns add their paths with `register_paths` at import time (video, metrics, auth).
"""

from __future__ import annotations

import copy
from typing import Any

from api.config import Settings

_EXTRA_PATHS: dict[str, dict[str, Any]] = {}
_EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {}


def register_paths(paths: dict[str, dict[str, Any]], schemas: dict[str, dict[str, Any]] | None = None) -> None:
    _EXTRA_PATHS.update(paths)
    _EXTRA_SCHEMAS.update(schemas or {})


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def error(description: str) -> dict[str, Any]:
    return {"description": description, "content": json_content(ref("Error"))}


def query_param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}
NULLABLE_PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1, "nullable": True}
THRESHOLD_PARAM = query_param("threshold", PROBABILITY, "Decision threshold: fake when p > threshold (default 0.5).")
REUSE_PARAM = query_param("reuse", {"type": "boolean"},
                          "Return a stored result for the same bytes, model version and threshold (default true).")
UNAVAILABLE = {"description": "Model, database or object store unavailable, or overloaded; see Retry-After.",
               "headers": {"Retry-After": {"schema": {"type": "integer"}}},
               "content": json_content(ref("Error"))}


def _schemas() -> dict[str, Any]:
    nullable_str = {"type": "string", "nullable": True}
    nullable_int = {"type": "integer", "nullable": True}
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "string"}, "message": {"type": "string"},
                "parameter": {"type": "string"}}, "additionalProperties": True}},
        },
        "Prediction": {
            "type": "object",
            "required": ["id", "media_type", "status", "threshold", "model_version", "sha256", "created_at"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "media_type": {"type": "string", "enum": ["image", "video"]},
                "status": {"type": "string", "enum": ["queued", "running", "done", "failed"]},
                "prediction": {"type": "string", "enum": ["fake", "real"], "nullable": True},
                "fake_probability": NULLABLE_PROBABILITY,
                "confidence": NULLABLE_PROBABILITY,
                "threshold": PROBABILITY,
                "model_version": {"type": "string"},
                "sha256": {"type": "string"},
                "filename": nullable_str,
                "size_bytes": {"type": "integer"},
                "width": nullable_int,
                "height": nullable_int,
                "processing_ms": {"type": "number", "nullable": True},
                "created_at": {"type": "string", "format": "date-time"},
                "result_url": nullable_str,
                "reused": {"type": "boolean"},
                "warning": {"type": "string"},
                "error": {"type": "string"},
            },
            "additionalProperties": True,
        },
        "BatchEntry": {
            "oneOf": [
                {"allOf": [ref("Prediction"), {"type": "object", "required": ["index"],
                                               "properties": {"index": {"type": "integer"}}}]},
                {"type": "object", "required": ["index", "status", "error"], "properties": {
                    "index": {"type": "integer"}, "filename": nullable_str, "status": {"type": "integer"},
                    "error": {"type": "object"}}},
            ],
        },
        "BatchResult": {
            "type": "object", "required": ["count", "results"],
            "properties": {"count": {"type": "integer"}, "succeeded": {"type": "integer"},
                           "failed": {"type": "integer"},
                           "results": {"type": "array", "items": ref("BatchEntry")}},
        },
        "PredictionList": {
            "type": "object", "required": ["total", "results"],
            "properties": {"total": {"type": "integer"}, "count": {"type": "integer"},
                           "limit": {"type": "integer"}, "offset": nullable_int,
                           "next_cursor": nullable_str,
                           "results": {"type": "array", "items": ref("Prediction")}},
        },
        "Stats": {
            "type": "object",
            "properties": {
                "since": {"type": "string", "format": "date-time"},
                "until": {"type": "string", "format": "date-time"},
                "total": {"type": "integer"},
                "by_prediction": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_media_type": {"type": "object", "additionalProperties": {"type": "integer"}},
                "by_status": {"type": "object", "additionalProperties": {"type": "integer"}},
                "per_day": {"type": "array", "items": {"type": "object", "properties": {
                    "date": {"type": "string"}, "count": {"type": "integer"}}}},
                "mean_fake_probability": {"type": "number", "nullable": True},
                "processing_ms": {"type": "object", "properties": {
                    "mean": {"type": "number", "nullable": True}, "p95": {"type": "number", "nullable": True}}},
            },
        },
        "Health": {
            "type": "object", "required": ["status", "ready"],
            "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]},
                           "ready": {"type": "boolean"}, "model": {"type": "object"},
                           "database": {"type": "object"}, "object_store": {"type": "object"},
                           "queue_depth": {"type": "integer"}, "warning": {"type": "string"}},
            "additionalProperties": True,
        },
    }


def _image_upload(field: str, many: bool) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": binary} if many else binary
    return {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [field],
        "properties": {field: schema, "threshold": PROBABILITY, "reuse": {"type": "boolean"}}}}}}


def _paths(settings: Settings) -> dict[str, Any]:
    filters = [
        query_param("prediction", {"type": "string", "enum": ["fake", "real"]}, "Only this verdict."),
        query_param("media_type", {"type": "string", "enum": ["image", "video"]}, "Only this media type."),
        query_param("status", {"type": "string", "enum": ["queued", "running", "done", "failed"]},
                    "Only this status."),
        query_param("since", {"type": "string", "format": "date-time"}, "Created at or after (ISO 8601)."),
        query_param("until", {"type": "string", "format": "date-time"}, "Created at or before (ISO 8601)."),
        query_param("min_probability", PROBABILITY, "Minimum fake probability."),
        query_param("max_probability", PROBABILITY, "Maximum fake probability."),
        query_param("sha256", {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}, "Exact SHA-256 of the input."),
        query_param("filename", {"type": "string", "maxLength": 255}, "Substring of the filename."),
        query_param("limit", {"type": "integer", "minimum": 1, "maximum": 500}, "Page size (default 50)."),
        query_param("offset", {"type": "integer", "minimum": 0, "maximum": 10_000_000}, "Rows to skip."),
        query_param("cursor", {"type": "string"}, "Opaque cursor from next_cursor; overrides offset."),
    ]
    id_param = {"name": "prediction_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "/health": {"get": {
            "summary": "Liveness and readiness", "tags": ["service"], "security": [],
            "responses": {"200": {"description": "Ready", "content": json_content(ref("Health"))},
                          "503": {"description": "Not ready", "content": json_content(ref("Health"))}}}},
        "/predict": {"post": {
            "summary": "Predict one image", "tags": ["predict"],
            "parameters": [THRESHOLD_PARAM, REUSE_PARAM],
            "requestBody": _image_upload("file", many=False),
            "responses": {
                "200": {"description": "Stored verdict", "content": json_content(ref("Prediction"))},
                "400": error("Missing field or bad parameter"),
                "413": error(f"Over {settings.max_image_bytes} bytes or {settings.max_image_pixels} pixels"),
                "415": error("Not JPEG, PNG, WebP, BMP, GIF or TIFF"),
                "422": error("Truncated or corrupt image"),
                "503": UNAVAILABLE}}},
        "/predict/batch": {"post": {
            "summary": f"Predict up to {settings.max_batch_files} images", "tags": ["predict"],
            "parameters": [THRESHOLD_PARAM, REUSE_PARAM],
            "requestBody": _image_upload("files", many=True),
            "responses": {
                "200": {"description": "One entry per file, in order; bad files carry their own error",
                        "content": json_content(ref("BatchResult"))},
                "400": error("No files, too many files, or bad parameter"),
                "413": error("Request body too large"),
                "503": UNAVAILABLE}}},
        "/predictions": {"get": {
            "summary": "List past predictions, newest first", "tags": ["query"], "parameters": filters,
            "responses": {"200": {"description": "A page", "content": json_content(ref("PredictionList"))},
                          "400": error("Bad filter value (names the parameter)"), "503": UNAVAILABLE}}},
        "/predictions/stats": {"get": {
            "summary": "Totals, per-day counts, mean probability, processing time", "tags": ["query"],
            "parameters": filters[3:5],
            "responses": {"200": {"description": "Statistics", "content": json_content(ref("Stats"))},
                          "400": error("Bad range"), "503": UNAVAILABLE}}},
        "/predictions/{prediction_id}": {"get": {
            "summary": "One prediction with a fresh result_url", "tags": ["query"], "parameters": [id_param],
            "responses": {"200": {"description": "The record", "content": json_content(ref("Prediction"))},
                          "404": error("Unknown id"), "503": UNAVAILABLE}}},
        "/objects/{bucket}/{key}": {"get": {
            "summary": "Signed link into the local object store (only without MinIO)", "tags": ["query"],
            "security": [],
            "parameters": [{"name": "bucket", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                           {"name": "expires", "in": "query", "required": True, "schema": {"type": "integer"}},
                           {"name": "signature", "in": "query", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The stored object",
                                  "content": {"application/json": {}, "image/png": {},
                                              "application/octet-stream": {}}},
                          "404": error("No such object, or the signature is bad or expired")}}},
        "/openapi.json": {"get": {
            "summary": "This document", "tags": ["service"], "security": [],
            "responses": {"200": {"description": "OpenAPI 3 document",
                                  "content": json_content({"type": "object"})}}}},
        "/docs": {"get": {
            "summary": "Human-readable API documentation", "tags": ["service"], "security": [],
            "responses": {"200": {"description": "HTML page", "content": {"text/html": {}}},
                          "308": {"description": "Redirect to /docs/, where the page is"}}}},
    }


# Access control and limits (api/auth.py, api/limits.py): every operation without its own
# `security` needs a key; every operation but the exempt ones can answer 429.
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer d3_<id>_<secret>"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
UNAUTHORIZED = {"description": "Missing, malformed, unknown or revoked API key",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                "content": json_content(ref("Error"))}
RATE_LIMITED = {"description": "Rate limit exceeded (per key, or per client address without one); see Retry-After.",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": json_content(ref("Error"))}
NOT_RATE_LIMITED = frozenset({"/health", "/metrics"})


def _add_access_responses(paths: dict[str, Any]) -> None:
    for path, item in paths.items():
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "patch", "head", "options"):
                continue
            responses = operation.setdefault("responses", {})
            if "security" not in operation:
                responses.setdefault("401", copy.deepcopy(UNAUTHORIZED))
            if path not in NOT_RATE_LIMITED:
                responses.setdefault("429", copy.deepcopy(RATE_LIMITED))


def build_spec(settings: Settings) -> dict[str, Any]:
    paths = _paths(settings)
    paths.update(copy.deepcopy(_EXTRA_PATHS))
    _add_access_responses(paths)
    schemas = _schemas()
    schemas.update(copy.deepcopy(_EXTRA_SCHEMAS))
    return {
        "openapi": "3.0.3",
        "info": {"title": "D3 Deepfake Detection API", "version": "0.1.0",
                 "description": "Tells whether an image or a video is AI-generated, with the D3 detector "
                                "(CVPR 2025). Every error is JSON: {\"error\": {\"code\", \"message\"}}."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": copy.deepcopy(SECURITY_SCHEMES)},
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
    }
