"""The OpenAPI document is generated from the schemas that parse the requests, and what Swagger UI's
"Try it out" sends from it works: each operation's request built from the document's own
defaults and examples is answered 200/202 with those values applied.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import image_bytes, make_app, post_form
from tests.video_clips import clip_bytes


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _sample(schema: dict) -> Any:
    """What Swagger UI puts in a form field with no default or example (its sampler's choices)."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind in ("number", "integer"):
        return schema.get("maximum", schema.get("minimum", 0))
    if kind == "boolean":
        return True
    return "string"


def _given(schema: dict) -> Any:
    for key in ("example", "default"):
        if key in schema:
            return schema[key]
    return None


def _word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def try_it_out(spec: dict, path: str, method: str, files: dict[str, tuple[str, bytes]]) -> tuple[dict, list]:
    """The query string and multipart fields Swagger UI sends for an operation, untouched by a user."""
    operation = spec["paths"][path][method]
    query = {}
    for parameter in operation.get("parameters", []):
        value = _given(parameter["schema"])
        if parameter["in"] == "query" and value is not None:  # an optional parameter without one stays empty
            query[parameter["name"]] = _word(value)
    fields: list = []
    body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
    if body:
        for name, prop in _resolve(spec, body["schema"]).get("properties", {}).items():
            prop = _resolve(spec, prop)
            if prop.get("format") == "binary" or prop.get("items", {}).get("format") == "binary":
                fields.append((name, files[name]))
            else:  # every property of a form body is prefilled
                value = _given(prop)
                fields.append((name, _word(_sample(prop) if value is None else value)))
    return query, fields


@pytest.fixture
def app_and_spec(tmp_path, tiny_engine):
    app = make_app(tmp_path, tiny_engine, DEFAULT_THRESHOLD="0.4", MAX_VIDEO_FRAMES="48", MAX_BATCH_FILES="5")
    return app, app.test_client().get("/openapi.json").get_json()


def _send(client, path: str, query: dict, fields: list):
    return post_form(client, path + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""), fields)


def test_try_it_out_on_predict_uses_the_servers_threshold(app_and_spec):
    app, spec = app_and_spec
    client = app.test_client()
    for path, name in (("/predict", "file"), ("/predict/batch", "files")):
        query, fields = try_it_out(spec, path, "post", {name: ("cat.png", image_bytes())})
        response = _send(client, path, query, fields)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        entries = body.get("results", [body])
        assert entries and all(entry["threshold"] == 0.4 for entry in entries), entries


def test_try_it_out_on_predict_video_is_answered(app_and_spec, tmp_path):
    app, spec = app_and_spec
    query, fields = try_it_out(spec, "/predict/video", "post", {"file": ("clip.avi", clip_bytes(tmp_path))})
    response = _send(app.test_client(), "/predict/video", query, fields)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["threshold"] == 0.4 and body["frames_analyzed"] >= 2 and "callback" not in body


def test_limits_in_the_document_are_the_settings(app_and_spec):
    _, spec = app_and_spec
    params = {p["name"]: p["schema"] for p in spec["paths"]["/predict/video"]["post"]["parameters"]}
    assert params["frames"]["maximum"] == 48
    assert params["threshold"]["default"] == 0.4
    batch = spec["paths"]["/predict/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert _resolve(spec, batch)["properties"]["files"]["maxItems"] == 5


def test_operation_ids_are_stable_and_unique(app_and_spec):
    _, spec = app_and_spec
    ids = {(path, method): op["operationId"] for path, item in spec["paths"].items() for method, op in item.items()}
    assert ids[("/predict", "post")] == "predictImage"
    assert ids[("/predict/batch", "post")] == "predictImageBatch"
    assert ids[("/predict/video", "post")] == "predictVideo"
    assert len(set(ids.values())) == len(ids)


def test_try_it_out_on_every_get_without_path_parameters(app_and_spec):
    app, spec = app_and_spec
    client = app.test_client()
    assert post_form(client, "/predict", [("file", ("cat.png", image_bytes()))]).status_code == 200
    tried = []
    for path, item in spec["paths"].items():
        if "get" not in item or "{" in path or "ui" in item["get"].get("tags", []):
            continue  # the web page's routes redirect or serve files (tests/test_web_routes.py)
        query, _ = try_it_out(spec, path, "get", {})
        response = client.get(path, query_string=query)
        assert response.status_code == 200, (path, query, response.get_data(as_text=True)[:300])
        tried.append(path)
    assert {"/predictions", "/predictions/stats", "/health", "/openapi.json", "/metrics"} <= set(tried)
    listing = client.get("/predictions", query_string=try_it_out(spec, "/predictions", "get", {})[0]).get_json()
    assert listing["total"] == 1 and listing["limit"] == 50
