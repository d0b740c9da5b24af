"""The web front end: GET /ui/ serves the built page (web/dist), `/` redirects there.

The page is a static bundle that talks to the public API only (web/README.md). Every response of
this blueprint carries a strict Content-Security-Policy: scripts, styles, fonts and fetches from
this origin only, no inline code; `blob:`/`data:` for the user's own media and the thumbnails
drawn from it. The same headers are set by web/nginx.conf where a static pod serves the bundle.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, redirect, send_from_directory
from werkzeug.security import safe_join

from api.exceptions import NotFound
from api.openapi import error, register_paths

bp = Blueprint("web", __name__)

DEFAULT_DIST = Path(__file__).resolve().parents[2] / "web" / "dist"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "media-src 'self' blob:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def dist_dir() -> Path:
    return Path(current_app.config.get("WEB_DIST_DIR") or DEFAULT_DIST)


def _not_built() -> NotFound:
    return NotFound("the web front end is not built: run `make setup` with Node.js installed "
                    "(or `npm ci && npm run build` in web/)")


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.get("/")
def root():
    return redirect("/ui/", code=302)


@bp.get("/ui")
def ui_redirect():
    return redirect("/ui/", code=308)


@bp.get("/ui/")
def index():
    directory = dist_dir()
    if not (directory / "index.html").is_file():
        raise _not_built()
    response = send_from_directory(directory, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # the page names hashed assets: always revalidate it
    return response


@bp.get("/ui/<path:name>")
def asset(name: str):
    directory = dist_dir()
    if safe_join(str(directory), name) is None or not (directory / name).is_file():
        raise NotFound(f"no such file in the web front end: {name}")
    hashed = name.startswith("assets/")  # Vite names them by content hash: cache them for good
    response = send_from_directory(directory, name, max_age=31_536_000 if hashed else 0)
    if hashed:
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    return response


# -- OpenAPI ------------------------------------------------------------------------------------------
_HTML = {"text/html": {"schema": {"type": "string"}}}
register_paths({
    "/": {"get": {
        "summary": "Redirect to the web front end", "tags": ["ui"], "security": [], "operationId": "getRoot",
        "responses": {"302": {"description": "To /ui/"}}}},
    "/ui": {"get": {
        "summary": "Redirect to /ui/", "tags": ["ui"], "security": [], "operationId": "getUiRedirect",
        "responses": {"308": {"description": "To /ui/, where the page is"}}}},
    "/ui/": {"get": {
        "summary": "The web front end (check a file, history, stats)", "tags": ["ui"], "security": [],
        "operationId": "getUi",
        "responses": {"200": {"description": "The page", "content": _HTML},
                      "404": error("The front end is not built (make setup builds it when Node.js is present)")}}},
    "/ui/{name}": {"get": {
        "summary": "A file of the web front end (scripts, styles, icons)", "tags": ["ui"], "security": [],
        "operationId": "getUiFile",
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "The file",
                              "content": {"application/javascript": {}, "text/css": {}, "image/svg+xml": {}}},
                      "404": error("No such file")}}},
})
