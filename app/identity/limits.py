"""Request rate limits: flask-limiter on Redis, one bucket per tenant and one per credential.

Limit values are read per request (callable limits): the tenant's `rate_limit`, else
RATE_LIMIT_DEFAULT, for the tenant's bucket; the tenant's `key_rate_limit`, else
RATE_LIMIT_PER_KEY_DEFAULT (empty: none), for each API key or user. Tenant settings come from the
identity cache, so this costs no database read. Buckets are shared across endpoints: a tenant's
limit is its limit, whichever routes it calls.

flask-limiter adds X-RateLimit-Limit/-Remaining/-Reset and Retry-After to every limited response,
and a breach raises its RateLimitExceeded, which app.errors answers as 429 `rate_limit_exceeded`.

When Redis is unreachable, RATELIMIT_FAIL_OPEN decides (it sets RATELIMIT_SWALLOW_ERRORS):
- true (default): flask-limiter logs the error and the request goes through unlimited; an outage
  of the limiter's storage must not become an outage of the gateway.
- false: the request is refused with 503 `rate_limit_unavailable` and Retry-After, for operators
  who would rather stop than serve unmetered.
The in-memory fallback is not used: it counts per process, so N workers would admit N times the limit.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import current_app, g
from flask_limiter.util import get_remote_address
from redis.exceptions import RedisError

from app import tracing
from app.errors import rate_limit_unavailable
from app.extensions import limiter
from app.identity.accounts import tenant_settings


def tenant_limit() -> str:
    """The tenant's limit. "" (none) before authentication: flask-limiter's before_request hook
    also evaluates the limits of callables an endpoint has used, though only to inspect them."""
    if g.get("principal") is None:
        return ""
    settings = tenant_settings(g.principal.tenant_id)
    return (settings and settings.rate_limit) or current_app.config["RATE_LIMIT_DEFAULT"]


def credential_limit() -> str:
    if g.get("principal") is None:
        return ""
    settings = tenant_settings(g.principal.tenant_id)
    return (settings and settings.key_rate_limit) or current_app.config["RATE_LIMIT_PER_KEY_DEFAULT"]


def tenant_key() -> str:
    return g.principal.tenant_id


def credential_key() -> str:
    return g.principal.subject


def token_endpoint_limit() -> str:
    return current_app.config["AUTH_TOKEN_RATE_LIMIT"]


@limiter.shared_limit(tenant_limit, scope="tenant", key_func=tenant_key)
@limiter.shared_limit(credential_limit, scope="credential", key_func=credential_key)
def _enforce_principal_limits() -> None:
    """Empty: flask-limiter's wrapper counts the hit, or raises 429, before calling it."""


@limiter.shared_limit(token_endpoint_limit, scope="auth-token", key_func=get_remote_address)
def _enforce_token_endpoint_limit() -> None:
    """Empty, as above; keyed by client address because the caller is not authenticated yet."""


@tracing.step("rate_limit")
def check() -> None:
    """Count this request against its tenant's and its credential's limits; 429 when over.

    Call after `authenticate()`: the buckets are keyed by the principal in `g.principal`.
    """
    if g.get("principal") is None:
        raise RuntimeError("limits.check() needs authenticate() to have run first")
    _guarded(_enforce_principal_limits)


def check_token_endpoint() -> None:
    """Password guessing costs an argon2 hash per try; bound it per client address."""
    _guarded(_enforce_token_endpoint_limit)


def _guarded(enforce: Callable[[], None]) -> None:
    try:
        try:
            enforce()
        finally:
            if not current_app.config["RATELIMIT_FAIL_OPEN"]:
                _read_header_window()
    except RedisError as exc:  # reaches here only with RATELIMIT_FAIL_OPEN=false
        # No window to show: without this, flask-limiter's header hook would ask Redis again.
        limiter.context.view_rate_limit = None
        raise rate_limit_unavailable() from exc


def _read_header_window() -> None:
    """Fetch the X-RateLimit-* window now, while a Redis failure can still be answered with our 503.

    flask-limiter reads it lazily, in its after_request hook, with a second Redis call; failing
    closed, that call raises out of after_request if Redis dies while the request runs, and the
    client gets a bare 500 from gunicorn (our hooks after it never run, so the in-flight gauge
    leaks too). Read here, the window is cached on the limit and the hook makes no Redis call;
    if this read fails, `_guarded` drops the limit from the headers and answers 503.
    """
    header_limit = limiter.current_limit
    if header_limit is not None:
        _ = header_limit.window
