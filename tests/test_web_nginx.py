"""The web front end's nginx pod config (web/nginx/default.conf.template), run by a real nginx that
serves a built bundle and passes the API through to the real service."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.deploy_helpers import Nginx, ensure_system_deps
from tests.helpers import ROOT, free_port, make_app

TEMPLATE = ROOT / "web" / "nginx" / "default.conf.template"


@pytest.fixture
def api_port(tmp_path, tiny_engine):
    from werkzeug.serving import make_server

    app = make_app(tmp_path, tiny_engine, AUTH_REQUIRED="true")
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port
    server.shutdown()
    thread.join(10)


@pytest.fixture
def nginx(tmp_path, api_port):
    ensure_system_deps()
    html = tmp_path / "html"
    (html / "assets").mkdir(parents=True)
    (html / "index.html").write_text('<!doctype html><div id="root"></div>')
    (html / "assets" / "app-abcd.js").write_text("export {}")
    (html / "favicon.svg").write_text("<svg/>")
    port = free_port()
    text = TEMPLATE.read_text()
    for old, new in (("${D3_API_UPSTREAM}", f"127.0.0.1:{api_port}"), ("/usr/share/nginx/html", str(html)),
                     ("listen 8080;", f"listen 127.0.0.1:{port};"), ("listen [::]:8080;", "")):
        assert old in text, f"{old!r} is no longer in {TEMPLATE.name}; update this test"
        text = text.replace(old, new)
    server = Nginx(tmp_path / "nginx", "".join(text))
    check = server.test_config()
    assert check.returncode == 0, check.stderr
    server.start([port])
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_the_static_pod_serves_the_page_under_the_csp_and_passes_the_api_through(nginx):
    page = requests.get(nginx + "/ui/", timeout=10)
    assert page.status_code == 200 and '<div id="root">' in page.text
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert "unsafe" not in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-cache"
    asset = requests.get(nginx + "/ui/assets/app-abcd.js", timeout=10)
    assert asset.status_code == 200 and asset.text == "export {}"
    assert "max-age=315360000" in asset.headers["Cache-Control"]
    assert "Content-Security-Policy" in asset.headers and asset.headers["X-Content-Type-Options"] == "nosniff"
    assert requests.get(nginx + "/ui/favicon.svg", timeout=10).text == "<svg/>"
    root = requests.get(nginx + "/", allow_redirects=False, timeout=10)
    assert root.status_code == 302 and root.headers["Location"].endswith("/ui/")
    # The API answers through the pod, on the page's origin: its own 401 JSON, its own health.
    refused = requests.get(nginx + "/predictions", timeout=10)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert requests.get(nginx + "/health", timeout=10).json()["status"] == "ok"
    assert requests.get(nginx + "/ui/../../etc/passwd", timeout=10).status_code in (400, 404)
    assert requests.get(nginx + "/elsewhere", timeout=10).status_code == 404
