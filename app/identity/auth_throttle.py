"""Throttling failed API-key authentications, decided before any hash is computed.

Verifying an API key costs one argon2 hash (about 30 ms of CPU, on the worker's hub). A caller
who knows a key's prefix, which is public (it is the OAuth2 client_id and shown in listings), can
send random secrets and make each one cost that hash: a CPU denial of service bought with
requests. So failed verifications are counted, and once over a limit further attempts are
refused with 429 `auth_failures_throttled` and Retry-After before the database or the hasher is
touched. Only failures count: a valid key never consumes any of these budgets.

Two budgets, on flask-limiter's storage (Redis, so shared by every worker; moving windows):

- per client address (AUTH_FAILURE_LIMIT_PER_ADDRESS, default 20/minute): an address over it gets
  no more verifications of any key. This is what stops one flooding client.
- per key prefix (AUTH_FAILURE_LIMIT_PER_PREFIX, default 50/minute): the prefix is then "under
  attack". Locking the prefix itself would hand anyone who knows it (everyone) a way to lock the
  key's owner out, so instead, while it is under attack, each address may try that prefix only if
  it has had no failure on that prefix in the same window: the owner, whose key verifies, never
  has one and keeps being served; every attacking address is cut to one hash per window for it.
  This is what stops a flood spread over many addresses from concentrating on one key.

What that leaves: a distributed flood costs at most one hash per attacking address per window
(and 20 per address across all prefixes); an owner who shares an address with an attacker (one
NAT) is throttled with it. A key already verified and cached in the worker (AUTH_KEY_CACHE_TTL)
is served without a hash and is never throttled. The client address is `request.remote_addr`:
behind a proxy, configure Werkzeug's ProxyFix so it is the real client's.

If the storage is unreachable, RATELIMIT_FAIL_OPEN decides, as for every other limit: true
verifies as if no failures were counted, false answers 503 `rate_limit_unavailable`.
"""

from __future__ import annotations

import math
import time

import structlog
from flask import current_app, has_request_context, request
from limits import RateLimitItem, parse
from redis.exceptions import RedisError

from app.errors import APIError
from app.extensions import limiter

log = structlog.get_logger(__name__)

NAMESPACE = "auth-failures"


def _address() -> str:
    return (request.remote_addr or "unknown") if has_request_context() else "local"


def _limits() -> tuple[RateLimitItem, RateLimitItem, RateLimitItem]:
    """(per address, per prefix, per address on a prefix under attack: one in the prefix's window)."""
    per_address = parse(current_app.config["AUTH_FAILURE_LIMIT_PER_ADDRESS"])
    per_prefix = parse(current_app.config["AUTH_FAILURE_LIMIT_PER_PREFIX"])
    return per_address, per_prefix, type(per_prefix)(1, per_prefix.multiples)


def check(prefix: str | None) -> None:
    """Raise 429 if this attempt must not be verified; call before any hash or lookup."""
    address = _address()
    per_address, per_prefix, per_pair = _limits()
    strategy = limiter.limiter
    try:
        if not strategy.test(per_address, NAMESPACE, "address", address):
            raise _throttled(per_address, ("address", address))
        if prefix is None or strategy.test(per_prefix, NAMESPACE, "prefix", prefix):
            return
        if not strategy.test(per_pair, NAMESPACE, "pair", prefix, address):
            raise _throttled(per_pair, ("pair", prefix, address))
    except RedisError as exc:
        _storage_down(exc)


def failed(prefix: str | None) -> None:
    """Count one failed verification against the address, the prefix and the pair."""
    address = _address()
    per_address, per_prefix, per_pair = _limits()
    strategy = limiter.limiter
    try:
        strategy.hit(per_address, NAMESPACE, "address", address)
        if prefix is not None:
            strategy.hit(per_prefix, NAMESPACE, "prefix", prefix)
            strategy.hit(per_pair, NAMESPACE, "pair", prefix, address)
    except RedisError as exc:
        _storage_down(exc)


def _throttled(item: RateLimitItem, identifiers: tuple[str, ...]) -> APIError:
    reset, _ = limiter.limiter.get_window_stats(item, NAMESPACE, *identifiers)
    retry_after = max(1, math.ceil(reset - time.time()))
    log.warning("auth_failures_throttled", bucket=identifiers[0], retry_after_s=retry_after)
    return APIError(
        429,
        f"Too many failed authentications from this client; retry in {retry_after} s.",
        code="auth_failures_throttled",
        headers={"Retry-After": str(retry_after)},
    )


def _storage_down(exc: RedisError) -> None:
    if current_app.config["RATELIMIT_FAIL_OPEN"]:
        log.warning("auth_throttle_unavailable", error=str(exc))
        return
    raise APIError(
        503,
        "Rate limiting is unavailable, and this gateway is configured to fail closed; retry shortly.",
        code="rate_limit_unavailable",
        headers={"Retry-After": "1"},
    ) from exc
