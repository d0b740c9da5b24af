"""The web front end's place in the app: /ui/ serving web/dist under a strict CSP, and the typed client
generated from the OpenAPI document the service serves (so the page and the API cannot drift)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.helpers import ROOT, make_app

WEB = ROOT / "web"


@pytest.fixture
def dist(tmp_path):
    directory = tmp_path / "dist"
    (directory / "assets").mkdir(parents=True)
    (directory / "index.html").write_text('<!doctype html><div id="root"></div><script type="module" '
                                          'src="./assets/app-1234.js"></script>')
    (directory / "assets" / "app-1234.js").write_text("console.log('d3')")
    (tmp_path / "secret.txt").write_text("not for the web")
    return directory


@pytest.fixture
def web_client(tmp_path, tiny_engine, dist):
    app = make_app(tmp_path, tiny_engine, AUTH_REQUIRED="true")
    app.config["WEB_DIST_DIR"] = str(dist)
    return app.test_client()


def test_the_page_and_its_assets_are_public_and_under_a_strict_csp(web_client):
    page = web_client.get("/ui/")
    assert page.status_code == 200 and b'<div id="root">' in page.data
    assert page.headers["Cache-Control"] == "no-cache"
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe" not in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    asset = web_client.get("/ui/assets/app-1234.js")
    assert asset.status_code == 200 and asset.data == b"console.log('d3')"
    assert "immutable" in asset.headers["Cache-Control"]
    assert "Content-Security-Policy" in asset.headers
    # The page needs no key; the API behind it still does.
    assert web_client.get("/predictions").status_code == 401


def test_redirects_to_the_page(web_client):
    root = web_client.get("/")
    assert root.status_code == 302 and root.headers["Location"].endswith("/ui/")
    bare = web_client.get("/ui")
    assert bare.status_code == 308 and bare.headers["Location"].endswith("/ui/")


@pytest.mark.parametrize("path", ["/ui/missing.js", "/ui/../secret.txt", "/ui/%2e%2e/secret.txt", "/ui/assets/"])
def test_nothing_outside_the_bundle_is_served(web_client, path):
    response = web_client.get(path)
    assert response.status_code in (404, 308)
    assert b"not for the web" not in response.data
    if response.status_code == 404:
        assert response.get_json()["error"]["code"] == "not_found"


def test_an_unbuilt_front_end_says_how_to_build_it(tmp_path, tiny_engine):
    app = make_app(tmp_path, tiny_engine)
    app.config["WEB_DIST_DIR"] = str(tmp_path / "nowhere")
    response = app.test_client().get("/ui/")
    assert response.status_code == 404
    assert "make setup" in response.get_json()["error"]["message"]


def test_the_typed_client_matches_the_served_openapi_document(client, tmp_path):
    served = client.get("/openapi.json").get_json()
    committed = json.loads((WEB / "openapi.json").read_text())
    assert served == committed, "web/openapi.json is out of date with the API: run `make web-client`"
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed: cannot regenerate the TypeScript client here")
    generator = WEB / "node_modules" / ".bin" / "openapi-typescript"
    if not generator.exists():
        pytest.fail("web/node_modules is missing: run `make setup` (npm ci in web/)")
    output = tmp_path / "schema.d.ts"  # from the committed document, now known to be the served one
    subprocess.run([str(generator), str(WEB / "openapi.json"), "-o", str(output)], check=True, cwd=WEB,
                   timeout=120, capture_output=True)
    assert output.read_text() == (WEB / "src" / "api" / "schema.d.ts").read_text(), \
        "web/src/api/schema.d.ts is not what openapi-typescript makes of the API: run `make web-client`"
