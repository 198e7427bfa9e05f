"""Throttling failed API-key authentications, decided before any hash is computed.

Verifying an API key costs a database lookup and a hash check: an HMAC (a microsecond) for keys
issued or upgraded since hashing.py moved keys off argon2, but one argon2 hash (about 30 ms of CPU)
for a legacy key until its first successful use rehashes it. A caller who knows a key's prefix,
which is public (it is the OAuth2 client_id and shown in listings), can send random secrets and
make each one cost that work: a denial of service bought with requests, and an online guessing
channel however hopeless. So failed verifications are counted, and once over a limit further attempts are
refused with 429 `auth_failures_throttled` and Retry-After before the database or the hasher is
touched. Only failures count, and only those that cost a hash (a wrong secret for an existing,
unrevoked key): a valid key never consumes any of these budgets, and a malformed key, an unknown
prefix or a revoked key, refused after one indexed lookup, counts nowhere, so a client retrying
a revoked key does not lock its address out.

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

Counting happens after the hash (only a failure is known to be one), so checking and counting
are two steps, and attempts that pass the check together would all be hashed before any of them
is counted: under a flood the limit would be overshot by everything that arrives during a hash.
So each worker runs one verification at a time per client address (`attempt` holds a per-address
gate across check, hash and count); concurrent attempts from one address queue, and once it is
over its budget each costs two Redis round trips. The overshoot is then at most one attempt per
address and worker. Concurrent requests from one address with one valid key still verify once:
the key cache's single flight holds the others, then serves them from the cache. Once a bucket
is over its limit, the worker remembers until when (`_blocks`), so the rest of a flood is
refused without a Redis round trip or a wait.

Even that refusal, made in Flask, costs a whole request: hooks, the error handler, metrics, the
access log line (0.83 ms of CPU each, bench/auth_bench.py: a 250/s flood took 21% of a core). So
`EarlyRefusal`, the outermost WSGI layer (outside the admission gate too: a flood takes none of
its slots), answers a request whose API key this worker already knows to be blocked (by its
address, or its address on that prefix) with the same 429 before anything else of ours runs; a
key the worker has verified and cached still passes, as above. Those refusals are counted in
`gateway_auth_throttled_early_total` and, to keep a flood from flooding the logs too, logged only
as the block itself (one line when a bucket goes over its limit).

That left the HTTP server's own work. Our part of an early refusal is about 10 us of CPU in
process (two dict lookups, the key's shape, a prebuilt body, the counter; it was 27 us behind the
admission gate), yet the worker spent 0.3-0.6 ms per flood request, as much as gunicorn's gevent
worker spends answering the same 429 from a bare WSGI app (bench/floor_app.py, the `floor` row of
`python -m bench.auth_bench --flood-only`): reading and parsing the request in Python, the environ,
the response. So the gunicorn worker (gunicorn_worker.py) asks `EarlyRefusal.refuse_before_parsing` about each
request of a new connection before gunicorn parses it, framing the head with httptools, and writes
the 429 itself; and this layer's refusal closes its connection, so that a flooding client's next
request arrives on a new one. With that, 10,000 bad secrets at 250/s from 8 addresses (2026-12-04)
cost 0.175 ms a request, 4.4% of a core, against the floor's 0.355 ms in the same run, and valid
requests at 50/s beside the flood kept their p99 (-0.03 ms).

If the storage is unreachable, RATELIMIT_FAIL_OPEN decides, as for every other limit: true
verifies as if no failures were counted, false answers 503 `rate_limit_unavailable`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from flask import Flask, current_app, has_request_context, request
from limits import RateLimitItem, parse
from prometheus_client import Counter
from redis.exceptions import RedisError

from app.admission import CLOSE_CONNECTION
from app.errors import APIError, rate_limit_unavailable
from app.extensions import limiter

log = structlog.get_logger(__name__)

NAMESPACE = "auth-failures"
REFUSED_EARLY = Counter(
    "gateway_auth_throttled_early",
    "Requests refused 429 auth_failures_throttled in front of the app: a block this worker already knew.",
)


class _Gate:
    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()


_gates: weakref.WeakValueDictionary[str, _Gate] = weakref.WeakValueDictionary()
_gates_lock = threading.Lock()


def _gate(address: str) -> _Gate:
    """This process's gate for `address`; it lives as long as someone holds or waits on it."""
    with _gates_lock:
        gate = _gates.get(address)
        if gate is None:
            gate = _gates[address] = _Gate()
        return gate


def _address() -> str:
    return (request.remote_addr or "unknown") if has_request_context() else "local"


@contextmanager
def attempt(prefix: str | None) -> Iterator[Callable[[], None]]:
    """Around one verification: 429 if it must not be made, else yields `failed` to call when the
    presented key turns out invalid. One verification per client address at a time (see above)."""
    address = _address()
    refuse_if_blocked(prefix)
    with _gate(address).lock:
        check(prefix, address)
        yield lambda: failed(prefix, address)


def refuse_if_blocked(prefix: str | None) -> None:
    """429 if this worker already knows the address (or the address on this prefix) is blocked: a
    dict lookup, so the bulk of a flood is refused before any Redis round trip, lock or hash."""
    address = _address()
    for bucket in (("address", address), ("pair", prefix, address) if prefix else None):
        until = _blocked_until(bucket) if bucket else None
        if until is not None:
            raise _refusal(until)


def _limits() -> tuple[RateLimitItem, RateLimitItem, RateLimitItem]:
    """(per address, per prefix, per address on a prefix under attack: one in the prefix's window)."""
    per_address = parse(current_app.config["AUTH_FAILURE_LIMIT_PER_ADDRESS"])
    per_prefix = parse(current_app.config["AUTH_FAILURE_LIMIT_PER_PREFIX"])
    return per_address, per_prefix, type(per_prefix)(1, per_prefix.multiples)


def check(prefix: str | None, address: str) -> None:
    """Raise 429 if this attempt must not be verified; runs before any hash or lookup."""
    per_address, per_prefix, per_pair = _limits()
    strategy = limiter.limiter
    try:
        if not strategy.test(per_address, NAMESPACE, "address", address):
            raise _block(per_address, ("address", address))
        if prefix is None or strategy.test(per_prefix, NAMESPACE, "prefix", prefix):
            return
        if not strategy.test(per_pair, NAMESPACE, "pair", prefix, address):
            raise _block(per_pair, ("pair", prefix, address))
    except RedisError as exc:
        _storage_down(exc)


def failed(prefix: str | None, address: str) -> None:
    """Count one failed verification against the address, the prefix and the pair."""
    per_address, per_prefix, per_pair = _limits()
    strategy = limiter.limiter
    try:
        strategy.hit(per_address, NAMESPACE, "address", address)
        if prefix is not None:
            strategy.hit(per_prefix, NAMESPACE, "prefix", prefix)
            strategy.hit(per_pair, NAMESPACE, "pair", prefix, address)
    except RedisError as exc:
        _storage_down(exc)


# Blocks this worker has learnt from the storage: bucket -> when it ends (time.time()). A flood
# keeps hitting a bucket that is over its limit, and each refusal after the first then costs a
# dict lookup instead of Redis round trips and a place in the address's queue. A moving window's
# reset is when its oldest failure leaves it, the first moment another attempt could be allowed.
# Kept per app (tests run many apps in one process, each with its own storage).
MAX_BLOCKS = 100_000


def _blocks() -> dict[tuple[str | None, ...], float]:
    return current_app.extensions.setdefault("auth_throttle_blocks", {})


def _message(retry_after: int) -> str:
    return f"Too many failed authentications from this client; retry in {retry_after} s."


def _blocked_until(bucket: tuple[str | None, ...]) -> float | None:
    blocks = _blocks()
    until = blocks.get(bucket)
    if until is not None and until <= time.time():
        blocks.pop(bucket, None)
        return None
    return until


def _block(item: RateLimitItem, bucket: tuple[str, ...]) -> APIError:
    until, _ = limiter.limiter.get_window_stats(item, NAMESPACE, *bucket)
    blocks = _blocks()
    if len(blocks) >= MAX_BLOCKS:
        now = time.time()
        for stale in [b for b, end in blocks.items() if end <= now]:
            blocks.pop(stale, None)
    blocks[bucket] = until
    log.warning("auth_failures_throttled", bucket=bucket[0], until=until)
    return _refusal(until)


def _refusal(until: float) -> APIError:
    retry_after = max(1, math.ceil(until - time.time()))
    return APIError(
        429,
        _message(retry_after),
        code="auth_failures_throttled",
        headers={"Retry-After": str(retry_after)},
    )


def _storage_down(exc: RedisError) -> None:
    if current_app.config["RATELIMIT_FAIL_OPEN"]:
        log.warning("auth_throttle_unavailable", error=str(exc))
        return
    raise rate_limit_unavailable() from exc


# The body of an early refusal, `% (retry_after, request_id)`: the app's own 429 (`_refusal`,
# rendered by app/errors.py), built once rather than JSON-encoded per request.
_EARLY_BODY = (
    json.dumps(
        {
            "error": {
                "message": _message(86_400_017),
                "type": "rate_limit_error",
                "param": None,
                "code": "auth_failures_throttled",
            },
            "request_id": "{request_id}",
        }
    )
    .encode()
    .replace(b"86400017", b"%d")
    .replace(b"{request_id}", b"%s")
)


class EarlyRefusal:
    """WSGI middleware: the 429 of a block this worker already knows, before Flask is entered.

    Mirrors `refuse_if_blocked` exactly (same buckets, same answer, same cached-key exemption), for
    requests carrying one of our API keys as a bearer token, on any path: a team's own blueprint
    that authenticates with `require_scopes` is protected as ours are. Anything it is not sure of
    goes to the app, which decides as before; so this only ever saves work, it never refuses what
    the app would serve.
    """

    def __init__(self, app: Flask, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        from app.identity.apikeys import KEY_PREFIX, split_key  # apikeys imports this module
        from app.observability import VALID_REQUEST_ID

        self.wsgi_app = wsgi_app
        self.key_prefix = "Bearer " + KEY_PREFIX
        self.split_key = split_key
        self.blocks: dict[tuple[str | None, ...], float] = app.extensions.setdefault(
            "auth_throttle_blocks", {}
        )
        self.cache = app.extensions["identity_cache"]
        self.valid_request_id = VALID_REQUEST_ID

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if self.blocks:  # no block known (the usual case): one truth test, and on to the app
            refused = self.refuse_before_parsing(
                environ.get("REMOTE_ADDR") or "unknown",
                environ.get("PATH_INFO", ""),
                environ.get("HTTP_AUTHORIZATION", ""),
                environ.get("HTTP_X_REQUEST_ID"),
            )
            if refused is not None:
                status, headers, body = refused
                # The client's next request comes on a new connection, which the gunicorn worker
                # refuses before its HTTP parser (gunicorn_worker.py); gunicorn ignores a WSGI
                # app's own Connection header, so the worker reads this key instead.
                environ[CLOSE_CONNECTION] = True
                start_response(status, [*headers, ("Content-Length", str(len(body)))])
                return [body]
        return self.wsgi_app(environ, start_response)

    def active(self) -> bool:
        """Whether any request could be refused now (the gunicorn worker asks per connection)."""
        return bool(self.blocks)

    def refuse_before_parsing(
        self, address: str, path: str, authorization: str, supplied_id: str | None
    ) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """The early 429 for a request with this Authorization from this address, as (status,
        headers without Content-Length, JSON body), or None when it is not one to refuse here. Any
        path: a flood of one blocked key is refused on all. Asked by the WSGI layer above and by
        the gunicorn worker, which writes the answer before gunicorn parses the request."""
        if not self.blocks or not authorization.startswith(self.key_prefix):
            return None
        until = self._blocked_until(address, authorization)
        if until is None:
            return None
        REFUSED_EARLY.inc()
        retry_after = max(1, math.ceil(until - time.time()))
        rid = (
            supplied_id if supplied_id and self.valid_request_id.match(supplied_id) else os.urandom(16).hex()
        )
        headers = [
            ("Content-Type", "application/json"),
            ("Retry-After", str(retry_after)),
            ("X-Request-ID", rid),
        ]
        # The id is [A-Za-z0-9._:-] and the number digits: neither needs JSON escaping.
        return "429 Too Many Requests", headers, _EARLY_BODY % (retry_after, rid.encode())

    def _blocked_until(self, address: str, authorization: str) -> float | None:
        """When the latest block on this request's buckets ends, or None (none, or a cached key)."""
        blocks = self.blocks
        presented = authorization[7:].strip()
        now = time.time()
        until = blocks.get(("address", address))
        if until is not None and until <= now:
            until = None
        parts = self.split_key(presented)
        if parts is not None:
            pair = blocks.get(("pair", parts[0], address))
            if pair is not None and pair > now and (until is None or pair > until):
                until = pair
        if until is None:
            return None
        if self.cache.get(("key", hashlib.sha256(presented.encode()).digest())) is not None:
            return None  # verified and cached: served without a hash, never throttled
        return until


def install_early_refusal(app: Flask) -> None:
    """Put `EarlyRefusal` in front of the app, outermost: called after every other middleware is
    installed (the admission gate included), so a refusal costs none of them. It is also first in
    `app.extensions["refusals_before_parsing"]`, where the gunicorn worker finds it."""
    early = EarlyRefusal(app, app.wsgi_app)
    app.extensions.setdefault("refusals_before_parsing", []).insert(0, early)
    app.wsgi_app = early  # type: ignore[method-assign]
