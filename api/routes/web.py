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
from api.openapi import Response as Responses
from api.openapi import ViewResult, api_spec, produces
from api.schemas import ErrorBody

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


NOT_BUILT = (ErrorBody, "The front end is not built (make setup builds it when Node.js is present)")


@bp.get("/")
@api_spec.validate(tags=["ui"], operation_id="getRoot", resp=Responses("HTTP_302"))
def root() -> ViewResult:
    """Redirect to the web front end"""
    return redirect("/ui/", code=302)


@bp.get("/ui")
@api_spec.validate(tags=["ui"], operation_id="getUiRedirect", resp=Responses("HTTP_308"))
def ui_redirect() -> ViewResult:
    """Redirect to /ui/, where the page is"""
    return redirect("/ui/", code=308)


@bp.get("/ui/")
@produces(200, "text/html", schema={"type": "string"})
@api_spec.validate(tags=["ui"], operation_id="getUi", resp=Responses(HTTP_200=(None, "The page"), HTTP_404=NOT_BUILT))
def index() -> ViewResult:
    """The web front end (check a file, history, stats)"""
    directory = dist_dir()
    if not (directory / "index.html").is_file():
        raise _not_built()
    response = send_from_directory(directory, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # the page names hashed assets: always revalidate it
    return response


@bp.get("/ui/<path:name>")
@produces(200, "application/javascript", "text/css", "image/svg+xml")
@api_spec.validate(tags=["ui"], operation_id="getUiFile", resp=Responses(
    HTTP_200=(None, "The file"), HTTP_404=(ErrorBody, "No such file")))
def asset(name: str) -> ViewResult:
    """A file of the web front end (scripts, styles, icons)"""
    directory = dist_dir()
    if safe_join(str(directory), name) is None or not (directory / name).is_file():
        raise NotFound(f"no such file in the web front end: {name}")
    hashed = name.startswith("assets/")  # Vite names them by content hash: cache them for good
    response = send_from_directory(directory, name, max_age=31_536_000 if hashed else 0)
    if hashed:
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    return response
