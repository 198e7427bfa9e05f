"""The per-process cache of verified credentials and tenant settings, and how it is invalidated.

Verifying an API key costs an indexed database read and a hash check (argon2, about 30 ms of CPU,
for a legacy key not yet upgraded to HMAC), so a verified key is cached for AUTH_KEY_CACHE_TTL_S
seconds, keyed by the SHA-256 of the presented key; 0 switches the cache off. Tenant settings (rate
limit, quota) and credential status for JWTs are cached the same way to keep the request path free
of database reads.

Invalidation across workers: every change that must take effect at once (a key revoked, a tenant
disabled or its limits changed) increments one revision counter in Redis after its database commit.
Each request reads the counter once and a worker that sees a new value drops its whole cache, so
the very next request on every worker re-reads the database. For a request with an API key already
in the cache the read rides in the rate-limit step's script (limits.py: no round trip of its own);
if it shows a new revision, that step authenticates the request again, from the database, before
it counts it, so a revoked key is refused on its very next request all the same. Every other
request (a cache miss, a JWT, the console) reads it with its own GET before authenticating.
Chosen over pub/sub because it needs no listener greenlet in each worker, cannot miss a message
across a reconnect or a Redis restart (a restart changes the value too), and costs one round trip
on a path that already makes several for rate limiting. If Redis is unreachable the cache keeps
serving entries until their TTL, so a revocation is then late by at most the TTL.
Without REDIS_URL (one process) the counter is local and invalidation is immediate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import structlog
from flask import Flask, current_app, g, has_request_context
from redis import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

REVISION_KEY = "identity:revision"
_UNREAD = object()  # a revision that could not be read
MAX_ENTRIES = 10_000
LOCK_STRIPES = 64


class IdentityCache:
    """TTL entries valid only while the revision they were read under is current."""

    def __init__(self, ttl: float, redis: Redis | None) -> None:
        self.ttl = ttl
        self._redis = redis
        self._entries: dict[Hashable, tuple[float, Any]] = {}
        self._revision: str | None = None
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def sync(self) -> bool:
        """Once per request: drop everything if another process changed identity data; returns
        whether it did."""
        if not self.enabled or self._redis is None:
            return False
        if has_request_context():
            if g.get("_identity_synced"):
                return False
            g._identity_synced = True
        return self.read_revision()

    def read_revision(self) -> bool:
        """One GET of the revision, applied; a Redis failure keeps the entries (late by the TTL)."""
        revision = self._fetch()
        return False if revision is _UNREAD else self.apply_revision(revision)

    def _fetch(self) -> Any:
        if self._redis is None:
            return _UNREAD
        try:
            return self._redis.get(REVISION_KEY)
        except RedisError as exc:
            log.warning("identity_revision_unavailable", error=str(exc))
            return _UNREAD

    def defer_sync(self) -> bool:
        """Leave this request's revision read to the rate-limit step, which reads it in its own
        round trip (limits.py); False when there is nothing to read (no cache, no Redis, or this
        request has already synced). Remembers the revision the request's entries were read under."""
        if not self.enabled or self._redis is None or not has_request_context() or g.get("_identity_synced"):
            return False
        g._identity_synced = True
        g._identity_sync_deferred = True
        g._identity_revision_used = self._revision
        return True

    def confirm(self, revision: str | object | None = _UNREAD) -> bool:
        """The deferred read (given, or made now): applies it, and says whether this request used
        entries older than it. Compared with the request's own revision, not the cache's: another
        greenlet may have applied the new revision after this request was served from the cache."""
        if revision is _UNREAD:
            revision = self._fetch()
            if revision is _UNREAD:
                return False  # Redis is down: entries live out their TTL, as in `sync`
        used = g.pop("_identity_revision_used", self._revision)
        self.apply_revision(revision)  # type: ignore[arg-type]
        return revision != used

    def apply_revision(self, revision: str | None) -> bool:
        """A revision read elsewhere; drops everything if it is new, and says whether it did."""
        if revision == self._revision:
            return False
        self._entries.clear()
        self._revision = revision
        return True

    def get(self, key: Hashable) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            self._entries.pop(key, None)
            return None
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if not self.enabled:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (time.monotonic() + self.ttl, value)

    def get_or_load(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """Single flight: concurrent misses for one key run `load` once, not once per greenlet.

        A value is kept only if no new revision was seen while it loaded: a load that began
        before a revocation must not be cached after the sync that dropped everything.
        """
        value = self.get(key)
        if value is not None or not self.enabled:
            return value if value is not None else load()
        with self._locks[hash(key) % LOCK_STRIPES]:
            value = self.get(key)
            if value is None:
                revision = self._revision
                value = load()
                if value is not None and revision == self._revision:
                    self.put(key, value)
        return value

    def invalidate(self) -> None:
        """After a committed change: every worker drops its cache on its next request.

        The change is committed already, so a Redis failure here is logged, not raised: other
        workers then pick the change up when their entries expire, within the TTL.
        """
        self._entries.clear()
        if self._redis is None:
            return
        try:
            self._redis.incr(REVISION_KEY)
        except RedisError as exc:
            log.error("identity_revision_not_bumped", error=str(exc), stale_for_at_most_s=self.ttl)


def cache() -> IdentityCache:
    return current_app.extensions["identity_cache"]


def init_app(app: Flask) -> None:
    ttl = float(app.config["AUTH_KEY_CACHE_TTL_S"])
    app.extensions["identity_cache"] = IdentityCache(ttl, app.extensions.get("redis_client"))
