"""Identity: tenants, users, API keys, tokens, and the request path's authentication step.

Request-path API (what other code imports):
- `app.identity.principal`: Principal, authenticate(), current_principal(), require_scopes(*scopes)
- `app.identity.limits`: check() (tenant + credential rate limits)
- `app.identity.quota`: reserve(principal, tokens) -> Reservation with settle(actual) / release()
"""

from __future__ import annotations

from flask import Flask

from app.identity import cache, cli, models, quota, tokens  # noqa: F401  (models registers the tables)


def init_app(app: Flask) -> None:
    """Bound by `create_app` after the extensions: caches, JWT settings and blocklist, quota counters, CLI."""
    cache.init_app(app)
    tokens.init_app(app)
    quota.init_app(app)
    cli.init_app(app)
