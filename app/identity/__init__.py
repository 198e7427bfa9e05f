"""Identity: tenants, users, API keys, tokens, and the request path's authentication step.

Request-path API (what other code imports):
- `app.identity.principal`: Principal, authenticate(), current_principal(), require_scopes(*scopes)
- `app.identity.limits`: check() (tenant + credential rate limits)
- `app.identity.quota`: reserve(principal, tokens) -> Reservation with settle(actual) / release()
"""

from __future__ import annotations

from flask import Flask

from app.identity import apikeys, auth_throttle, cache, cli, models, quota, tokens  # noqa: F401  (models: tables)
from app.identity import scopes as sc


def oauth2_scheme(url_prefix: str = "") -> dict[str, object]:
    """The OpenAPI security scheme of POST /v1/auth/token: both RFC 6749 grants, every scope."""
    flow = {
        "tokenUrl": f"{url_prefix}/v1/auth/token",
        "refreshUrl": f"{url_prefix}/v1/auth/refresh",
        "scopes": sc.DESCRIPTIONS,
    }
    return {"type": "oauth2", "flows": {"password": flow, "clientCredentials": flow}}


def init_app(app: Flask) -> None:
    """Bound by `create_app` after the extensions: caches, the key hasher, JWT settings and blocklist,
    quota counters, CLI."""
    cache.init_app(app)
    apikeys.init_app(app)
    tokens.init_app(app)
    quota.init_app(app)
    cli.init_app(app)
