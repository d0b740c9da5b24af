"""/health, /openapi.json and /docs."""

from __future__ import annotations

import io
import threading

import torch
from openapi_spec_validator import validate

from api.detector import DetectorConfig, InferenceEngine
from tests.helpers import image_bytes, make_app


def test_health_ready_body(client, tiny_engine):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok" and body["ready"] is True
    assert body["model"]["ready"] is True and body["model"]["trained"] is False
    assert body["model"]["model_version"] == tiny_engine.model_version
    assert body["database"] == {"reachable": True, "backend": "sqlite"}
    assert body["object_store"] == {"reachable": True, "kind": "local"}
    assert body["queue_depth"] == 0
    assert "verdicts mean nothing" in body["warning"]
    assert "verdicts mean nothing" in response.headers["X-D3-Warning"]


class _BlockedModel(torch.nn.Module):
    """Loads only when the test lets it: stands for a slow model load."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate.wait(30)
        return torch.full((x.shape[0],), 0.25)


def test_health_is_503_until_the_model_is_warm(tmp_path):
    gate = threading.Event()
    engine = InferenceEngine(DetectorConfig(device="cpu"), model=_BlockedModel(gate))
    engine.start()  # warm-up forward blocks on the gate
    try:
        client = make_app(tmp_path, engine).test_client()
        response = client.get("/health")
        assert response.status_code == 503
        assert response.get_json()["ready"] is False and response.headers["Retry-After"]
        predict = client.post("/predict", data={"file": (io.BytesIO(image_bytes()), "x.png")},
                              content_type="multipart/form-data")
        assert predict.status_code == 503 and "loading" in predict.get_json()["error"]["message"]
        assert predict.headers["Retry-After"]
        gate.set()
        assert engine.wait_ready(30)
        assert client.get("/health").status_code == 200
    finally:
        gate.set()
        engine.stop()


def test_openapi_document_is_valid_and_lists_every_route(app, client):
    spec = client.get("/openapi.json").get_json()
    validate(spec)
    documented = {(path, method.upper()) for path, item in spec["paths"].items() for method in item}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("docs.swagger_ui"):
            continue
        path = rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, f"{method} {path} is not in /openapi.json"


def test_docs_page_is_served_without_a_cdn(client):
    page = client.get("/docs/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "swagger-ui" in html and "/openapi.json" in html
    assert "https://" not in html.replace("https://swagger.io", "")  # every asset is local
    asset = client.get("/docs/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.data) > 100_000
