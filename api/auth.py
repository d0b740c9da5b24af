"""Who is calling: API keys from `Authorization: Bearer <key>` or `X-API-Key`, checked before every view.

- A valid key sets `g.caller` (owner = key id, name, is_admin); the routes scope data by it.
- A presented key that is malformed, unknown, wrong or revoked is refused with 401 on every
  protected route, whether or not AUTH_REQUIRED is on (a client with a bad key must find out).
- With AUTH_REQUIRED (the default), a request without a key gets 401 on every route except the
  public ones below. Without it (loopback quick-start only, see config.validate), such a request
  is anonymous.
- Public routes never answer 401: they treat a bad key like no key. `/health` then shows only
  its summary, `/metrics` decides by network (api/metrics.py), signed `/objects` links carry
  their own proof.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Flask, Response, g, request
from werkzeug.routing import RequestRedirect

from api.errors import error_response
from api.services.keys import KeyProblem


@dataclass(frozen=True)
class Caller:
    """Who is asking: `owner` scopes what they see (None = anonymous); admins see everything."""

    owner: str | None
    name: str
    is_admin: bool = False


ANONYMOUS = Caller(owner=None, name="anonymous")


def current_caller() -> Caller:
    # The `_authenticate` hook below sets g.caller before the view runs; without it, anonymous.
    return getattr(g, "caller", ANONYMOUS)


# Endpoint names (blueprint.view) that need no key.
PUBLIC_ENDPOINTS = frozenset({
    "health.health",
    "docs.openapi",
    "objects.get_object",
    "metrics.metrics",
    "web.root",
    "web.ui_redirect",
    "web.index",
    "web.asset",
})
PUBLIC_PREFIXES = ("docs.swagger_ui.",)  # the Swagger UI page and its bundled assets

REALM = 'Bearer realm="d3-api"'
MESSAGES = {
    None: "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
    KeyProblem.MALFORMED: "the API key is malformed; keys look like d3_<id>_<secret>",
    KeyProblem.UNKNOWN: "the API key is not valid",
    KeyProblem.REVOKED: "the API key has been revoked",
}


def is_public(endpoint: str | None) -> bool:
    return endpoint is not None and (endpoint in PUBLIC_ENDPOINTS or endpoint.startswith(PUBLIC_PREFIXES))


def presented_key() -> str | None:
    """The key the client sent, or None. Authorization wins when both headers are present."""
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return ""  # some other scheme (Basic, ...): a malformed credential, not a missing one
        return value.strip()
    header = request.headers.get("X-API-Key")
    return header.strip() if header is not None else None


def unauthorized(problem: KeyProblem | None) -> Response:
    challenge = REALM if problem is None else f'{REALM}, error="invalid_token"'
    return error_response(401, "unauthorized", MESSAGES[problem], {"WWW-Authenticate": challenge})


def init_cors(app: Flask) -> None:
    """CORS only for an explicit allow-list (CORS_ORIGINS); off by default. No cookies are used."""
    origins = app.config["SETTINGS"].cors_origins
    if not origins:
        return
    from flask_cors import CORS

    CORS(app, origins=origins, supports_credentials=False, max_age=600,
         allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
         expose_headers=["X-Request-ID", "Retry-After", "X-D3-Warning", "WWW-Authenticate"])


def init_app(app: Flask) -> None:
    init_cors(app)
    keys = app.extensions["d3"].keys
    auth_required = app.extensions["d3"].settings.auth_required

    @app.before_request
    def _authenticate():
        if request.method == "OPTIONS":  # CORS preflight carries no credentials by design
            return None
        if isinstance(request.routing_exception, RequestRedirect):  # /docs -> /docs/: reveals nothing
            return None
        public = is_public(request.endpoint)
        key = presented_key()
        if key is None:
            if auth_required and not public:
                return unauthorized(None)
            return None
        verification = keys.verify(key) if key else None
        if verification is None or verification.key is None:
            if public:
                return None
            return unauthorized(verification.problem if verification else KeyProblem.MALFORMED)
        info = verification.key
        g.caller = Caller(owner=info.id, name=info.name, is_admin=info.is_admin)
        return None
