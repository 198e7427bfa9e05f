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

One round trip for both buckets. flask-limiter makes one Redis call per limit it hits and a third,
after the view, for the X-RateLimit-* window: three round trips, about half of the rate-limit
step's CPU. With its Redis storage and the moving window (the defaults here), `check()` instead
runs one script beside it, `_MOVING_WINDOW_HITS`, that does what limits' own
acquire_moving_window.lua and moving_window.lua do, on the same keys (built by the same
`RateLimitItem.key_for` and `prefixed_key`), for every limit in flask-limiter's order, stopping at
the first breach as flask-limiter does, and returns each window; the windows are handed to
flask-limiter's request context, so its header hook writes the headers without asking Redis again.
The identity cache's revision (identity/cache.py) is read in the same script when the request's
API key was served from the cache, so such a request makes this one round trip and the quota's.
flask-limiter stays the configuration surface (limit strings, RATELIMIT_* settings, storage,
strategy, headers, the 429 it raises); any other storage or strategy goes through flask-limiter
unchanged.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from flask import Flask, current_app, g, request
from flask_limiter import RequestLimit
from flask_limiter.errors import RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import RateLimitItem, parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter
from limits.util import WindowStats
from redis.exceptions import RedisError

from app import tracing
from app.admission import GATEWAY_BLUEPRINTS
from app.errors import rate_limit_unavailable
from app.extensions import limiter
from app.identity.accounts import tenant_settings
from app.identity.cache import REVISION_KEY, cache


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


# KEYS: one list per limit, then optionally the identity revision key. ARGV: now, the number of
# limits, then limit and expiry for each. Per limit, limits' acquire_moving_window.lua (cost 1)
# and then moving_window.lua's window, stopping after a breach; returns {windows, revision}.
_MOVING_WINDOW_HITS = """
local now, limits = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 1, limits do
  local key, limit, expiry = KEYS[i], tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  local acquired = 0
  if limit >= 1 then
    local entry = redis.call('lindex', key, limit - 1)
    if not (entry and tonumber(entry) >= now - expiry) then
      redis.call('lpush', key, now)
      redis.call('ltrim', key, 0, limit - 1)
      redis.call('expire', key, expiry)
      acquired = 1
    end
  end
  local low, high, index = 0, limit - 1, nil
  while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', key, mid))
    if value and value >= now - expiry then index = mid; low = mid + 1 else high = mid - 1 end
  end
  if index then
    out[i] = {acquired, tostring(redis.call('lindex', key, index)), index + 1}
  else
    out[i] = {acquired, '', 0}
  end
  if acquired == 0 then break end
end
local revision = false
if #KEYS > limits then revision = redis.call('GET', KEYS[#KEYS]) end
return {out, revision}
"""


class _Breached:
    """What RateLimitExceeded reads of the limit that was hit (flask-limiter's RuntimeLimit has
    much more, none of which its 429 uses): the item, and no custom message."""

    error_message = None

    def __init__(self, limit: RateLimitItem) -> None:
        self.limit = limit


@functools.lru_cache(maxsize=1024)
def _items(value: str) -> tuple[RateLimitItem, ...]:
    """A limit string's items, parsed once per distinct string (tenants share a few values)."""
    return tuple(parse_many(value)) if value else ()


@tracing.step("rate_limit")
def check() -> None:
    """Count this request against its tenant's and its credential's limits; 429 when over.

    Call after `authenticate()`: the buckets are keyed by the principal in `g.principal`.
    """
    if g.get("principal") is None:
        raise RuntimeError("limits.check() needs authenticate() to have run first")
    deferred = bool(g.pop("_identity_sync_deferred", False))
    config = current_app.config
    scripted = (
        limiter.enabled
        and isinstance(limiter.limiter, MovingWindowRateLimiter)
        and isinstance(limiter.storage, RedisStorage)
    )
    if scripted:
        # The revision rides along only if the limiter's Redis is the one identity writes it to.
        with_revision = deferred and config.get("RATELIMIT_STORAGE_URI") == config.get("REDIS_URL")
        if deferred and not with_revision and cache().confirm():
            _reauthenticate()
        _guarded(lambda: _hit_principal_limits(with_revision))
        return
    if deferred and cache().confirm():
        _reauthenticate()
    _guarded(_enforce_principal_limits)


def _reauthenticate() -> None:
    # Imported here: principal.py imports this module for require_scopes.
    from app.identity.principal import reauthenticate

    reauthenticate()


def _hit_principal_limits(with_revision: bool = False) -> None:
    """Both buckets in one round trip (see the module docstring), as flask-limiter would hit them,
    with the identity revision read in the same script when the key was served from the cache.

    If the revision is new, the request is authenticated again from the database (a revoked key
    is refused here) and counted again under what it now is: the first hit stays counted, an
    overcount of one request per bucket and worker after each identity change."""
    prefix = current_app.config.get("RATELIMIT_KEY_PREFIX") or ""
    wanted = [
        (item, [prefix, key, scope] if prefix else [key, scope])
        for limit, key, scope in (  # in the order flask-limiter holds the decorators below
            (credential_limit(), credential_key(), "credential"),
            (tenant_limit(), tenant_key(), "tenant"),
        )
        for item in _items(limit)
    ]
    wanted.sort(key=lambda pair: pair[0])  # flask-limiter's order: by granularity, stable
    if not wanted and not with_revision:
        return
    storage: RedisStorage = limiter.storage  # type: ignore[assignment]
    now = time.time()
    keys = [storage.prefixed_key(item.key_for(*ids)) for item, ids in wanted]
    args: list[object] = [now, len(wanted)]
    for item, _ in wanted:
        args += [item.amount, item.get_expiry()]
    try:
        windows, revision = _script(current_app, storage)(
            keys=[*keys, REVISION_KEY] if with_revision else keys, args=args
        )
    except RedisError:
        if not current_app.config["RATELIMIT_SWALLOW_ERRORS"]:
            raise
        limiter.logger.exception("Failed to rate limit. Swallowing error")  # flask-limiter's own line
        return
    if with_revision:
        revision = revision.decode() if isinstance(revision, bytes) else revision
        if cache().confirm(revision):
            _reauthenticate()
            _hit_principal_limits()
            return
    if not wanted:
        return
    views: list[RequestLimit] = []
    breached: RequestLimit | None = None
    for (item, ids), (acquired, oldest, count) in zip(wanted, windows, strict=False):
        view = RequestLimit(limiter, item, ids, not acquired, True)
        start = float(oldest) if count else now
        # The window flask-limiter's header hook would fetch with another round trip: as read by the
        # script, just after this request's hit.
        view._window = WindowStats(start + item.get_expiry(), item.amount - int(count))
        views.append(view)
        if not acquired:
            breached = view
            limiter.logger.info("ratelimit %s (%s) exceeded", item, ids[-2])
    context = limiter.context
    context.view_rate_limit = breached or views[0]
    context.view_rate_limits = views
    if breached is not None:
        raise RateLimitExceeded(_Breached(breached.limit))  # type: ignore[arg-type]


def _script(app: Flask, storage: RedisStorage) -> Callable[..., list[list[object]]]:
    """The script, registered once per app on the limiter storage's own Redis client."""
    registered = app.extensions.get("rate_limit_script")
    if registered is None or registered[0] is not storage:
        registered = (storage, storage.get_connection().register_script(_MOVING_WINDOW_HITS))
        app.extensions["rate_limit_script"] = registered
    return registered[1]


def check_token_endpoint() -> None:
    """Password guessing costs an argon2 hash per try; bound it per client address."""
    _guarded(_enforce_token_endpoint_limit)


@limiter.request_filter
def _not_called_by_us() -> bool:
    """flask-limiter's before_request hook looks for decorated or default limits on every request;
    the gateway's views have none (their limits are applied here, explicitly), so for them the
    hook is skipped. Our explicit checks mark themselves, and a host app's routes are untouched."""
    return request.blueprint in GATEWAY_BLUEPRINTS and not g.get("_limits_explicit")


def _guarded(enforce: Callable[[], None]) -> None:
    g._limits_explicit = True
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
