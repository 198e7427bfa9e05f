"""The admin console: server-rendered pages over the same service functions as the governance API.

It is a plain Flask Blueprint, not a flask-smorest one, so it stays out of the OpenAPI document.

Credentials. Logging in runs the OAuth2 token endpoint's own grant functions (password, or
client_credentials for an API key) and keeps the resulting JWTs in the signed session cookie:
HttpOnly (page scripts never see it), SameSite=Strict, Secure whenever the request came over
https, and scoped to `/console`. An API key is exchanged for a short-lived access token rather
than stored, so the cookie never carries a long-lived secret. Every request builds its Principal
with `authenticate(credential)`, the API's authentication step, and pages check scopes with the
API's `check_scopes` and rate limits: the console can never show or do more than the API would.
When the access token expires a password session rotates its refresh token; logging out revokes
both.

CSRF. flask-wtf is not installed and the console needs only one check, so the synchronizer token
is written here (about 20 lines): a random per-session token rendered into every form and
compared in constant time on every POST, before any view runs. SameSite=Strict already keeps
the cookie off cross-site requests; the token covers browsers or proxies that ignore it.

Content-Security-Policy. Every console response gets `script-src 'self'; style-src 'self'`
with no inline code: scripts and styles are static files of this package (Chart.js vendored with
its licence in `static/chartjs/`), and chart data rides in `data-*` attributes.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import structlog
from flask import (
    Blueprint,
    Flask,
    Request,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.sessions import SecureCookieSessionInterface, SessionInterface, SessionMixin
from werkzeug.exceptions import HTTPException

from app.errors import APIError
from app.identity import limits, tokens
from app.identity.principal import Principal, authenticate, check_scopes

log = structlog.get_logger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
CSRF_FIELD = "csrf_token"

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """The console's own signed cookie (`gw_console`: Strict, HttpOnly, path of the console,
    Secure whenever the request itself came over https, so a plain-http development server still
    works), for console requests only. Flask has one session interface per app, and the gateway
    may be mounted on a host app with sessions of its own: every other request goes to the
    interface the app had, with the host's cookie settings untouched."""

    def __init__(self, host: SessionInterface, path: str) -> None:
        self.host = host
        self.path = path

    def _ours(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")

    def open_session(self, app: Flask, req: Request) -> SessionMixin | None:
        return super().open_session(app, req) if self._ours(req.path) else self.host.open_session(app, req)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if self._ours(request.path):
            super().save_session(app, session, response)  # type: ignore[arg-type]
        else:
            self.host.save_session(app, session, response)

    def get_cookie_name(self, app: Flask) -> str:
        return "gw_console"

    def get_cookie_path(self, app: Flask) -> str:
        return self.path

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Strict"

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure or super().get_cookie_secure(app)


def csrf_token() -> str:
    """The session's CSRF token, made on first use; templates put it in every form."""
    if CSRF_FIELD not in session:
        session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return session[CSRF_FIELD]


@bp.before_request
def check_csrf() -> None:
    if request.method == "POST":
        request.get_data(cache=True)  # a body over MAX_CONTENT_LENGTH is a 413, whatever its type
        expected = session.get(CSRF_FIELD)
        sent = request.form.get(CSRF_FIELD, "")
        if not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
            raise APIError(
                400, "The form's security token is missing or stale: reload the page.", code="csrf_failed"
            )


@bp.after_request
def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONSOLE_CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"  # pages may show a key's secret, once
    return response


def start_session(pair: dict[str, Any]) -> Principal:
    """A fresh session (new CSRF token: no fixation) holding a token pair from a grant."""
    session.clear()
    session["access"] = pair["access_token"]
    session["refresh"] = pair.get("refresh_token")
    csrf_token()
    return authenticate(pair["access_token"])


def end_session() -> None:
    """Revoke the session's tokens (each takes its pair with it) and forget them."""
    for kind, token in (("access", session.get("access")), ("refresh", session.get("refresh"))):
        if token:
            with contextlib.suppress(APIError):  # expired or already revoked: nothing left to end
                tokens.revoke(tokens.verified_claims(refresh=kind == "refresh", token=token))
    session.clear()


def console_principal() -> Principal:
    """The session's Principal, built by the API's authentication step; an expired access token
    of a password session is renewed once with its (single-use) refresh token."""
    access = session.get("access")
    if not access:
        raise APIError(401, "Please log in.", code="missing_token")
    try:
        return authenticate(access)
    except APIError as exc:
        if exc.code != "token_expired" or not session.get("refresh"):
            raise
    pair = tokens.refresh(tokens.verified_claims(refresh=True, token=session["refresh"]))
    session["access"], session["refresh"] = pair["access_token"], pair.get("refresh_token")
    return authenticate(pair["access_token"])


def page(*scopes: str) -> Callable[[F], F]:
    """Authenticate from the session, check `scopes`, rate-limit: `require_scopes`' order."""

    def decorator(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check_scopes(console_principal(), scopes)
            limits.check()
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def _wants_json() -> bool:
    """A script (a JSON body, or an Accept preferring JSON) gets the API's error shape; a browser
    gets a page."""
    accepted = request.accept_mimetypes
    prefers_json = accepted.best_match(["text/html", "application/json"]) == "application/json"
    return request.is_json or (bool(accepted) and prefers_json)


def _error_page(status: int, message: str, code: str | None) -> Response | tuple[str, int]:
    if _wants_json():
        return APIError(status, message, code=code).response()
    if status == 401:
        session.pop("access", None)
        session.pop("refresh", None)
        flash(message)
        return redirect(url_for("console.login"))
    return render_template("console/error.html", status=status, message=message, code=code), status


@bp.errorhandler(APIError)
def api_error(error: APIError) -> Response | tuple[str, int]:
    return _error_page(error.status, error.message, error.code)


@bp.errorhandler(HTTPException)
def http_error(error: HTTPException) -> Response | tuple[str, int]:
    return _error_page(error.code or 500, error.description or error.name, None)


@bp.errorhandler(Exception)
def unexpected(error: Exception) -> Response | tuple[str, int]:
    log.exception("console_error", error_class=type(error).__name__)
    return _error_page(500, "The server had an internal error; quote the request id to the operator.", None)


@bp.app_template_global()
def principal() -> Principal | None:
    return g.get("principal")


bp.add_app_template_global(csrf_token, "csrf_token")


@bp.record_once
def _configure_session(state: BlueprintSetupState) -> None:
    """The session cookie belongs to the console alone: Strict, HttpOnly, path `/console`."""
    app: Flask = state.app
    app.session_interface = ConsoleSessionInterface(app.session_interface, state.url_prefix or "/console")


from app.console import views  # noqa: E402, F401  (registers the pages on `bp`)
