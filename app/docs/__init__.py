"""Swagger UI and ReDoc assets served from our own origin, so `/docs` and `/redoc` render offline.

flask-smorest renders both pages but loads their JavaScript from wherever
`OPENAPI_SWAGGER_UI_URL` / `OPENAPI_REDOC_URL` point; the defaults were a CDN, so on a machine
without internet both pages were blank. Here:

- Swagger UI comes from the `flask-swagger-ui` wheel, which packages swagger-ui-dist 5.x (5.x is
  the first line that renders OpenAPI 3.1, the version of our spec). Only its `dist/` folder is
  used: flask-smorest keeps rendering the page, so its config (`OPENAPI_SWAGGER_UI_CONFIG`) still
  applies.
- ReDoc has no Python packaging, so its standalone bundle is vendored in `static/redoc/` with its
  licence and version (npm `redoc@2.5.4`; 2.x renders OpenAPI 3.1).

The assets are public like the pages that load them, and never change between releases of the
packages, so they are sent with a long cache lifetime. The two pages get a Content-Security-Policy
that keeps them on our origin: ReDoc's bundle shows a logo from cdn.redoc.ly (it hides itself when
unreachable), and an operator's docs page should not make third-party requests at all.
"""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, Flask, Response, request, send_from_directory

SWAGGER_UI_DIR = Path(flask_swagger_ui.__file__).parent / "dist"
REDOC_DIR = Path(__file__).parent / "static" / "redoc"
ASSET_MAX_AGE_S = 7 * 24 * 3600
DOC_PAGES = frozenset({"openapi_swagger_ui", "openapi_redoc"})
# flask-smorest's page templates carry an inline <script> (Swagger UI's config) and both UIs set
# inline styles; ReDoc renders in a worker it starts from a blob: URL. Nothing leaves 'self'.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

blp = Blueprint("docs_assets", __name__)


@blp.get("/swagger-ui/<path:filename>")
def swagger_ui_asset(filename: str) -> Response:
    return send_from_directory(SWAGGER_UI_DIR, filename, max_age=ASSET_MAX_AGE_S)


@blp.get("/redoc/<path:filename>")
def redoc_asset(filename: str) -> Response:
    return send_from_directory(REDOC_DIR, filename, max_age=ASSET_MAX_AGE_S)


def _docs_csp(response: Response) -> Response:
    if request.endpoint and request.endpoint.rpartition(".")[2] in DOC_PAGES:
        response.headers.setdefault("Content-Security-Policy", DOCS_CSP)
    return response


def init_app(app: Flask) -> None:
    """Serve the assets; config's OPENAPI_SWAGGER_UI_URL / OPENAPI_REDOC_URL point the pages here."""
    app.register_blueprint(blp, url_prefix=f"{app.config.get('GATEWAY_URL_PREFIX', '')}/docs/assets")
    app.after_request(_docs_csp)
