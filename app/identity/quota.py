"""Token quotas per tenant and period (day or month, UTC): reserve, then settle or release.

`reserve(principal, max_tokens)` admits a request only if the tenant's counter plus `max_tokens`
fits its `token_quota`; the check-and-add is one Lua script, so concurrent requests on any
number of workers can never overshoot. `Reservation.settle(actual)` replaces the reservation with
the tokens really used and adds them to the `token_usage` ledger (batched: see ledger.py);
`release()` gives the reservation back (failure, client disconnect). Whichever of the two runs
first wins; later calls are no-ops, so `try: ... settle(n) finally: release()` is the intended pattern.

The database is the ledger and Redis a counter of ledger plus in-flight reservations: when the
Redis key is missing (first use in a period, or Redis restarted or flushed) it is rebuilt from the
ledger before the reservation is counted, so a restart loses no settled usage. Each rebuild gets a
new epoch; a reservation made under an older epoch settles by adding its actual tokens, since the
rebuilt counter never held its reservation.

Without REDIS_URL the counter lives in the process (one worker; the dev default). If Redis is
configured but unreachable, tenants with a quota get 503 `quota_unavailable`: admitting unmetered
spend is worse than a short refusal. Tenants without a quota are never blocked; their usage is
still recorded.
"""

from __future__ import annotations

import calendar
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog
from flask import Flask, current_app
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import select

from app import tracing
from app.errors import APIError
from app.extensions import db
from app.identity.accounts import tenant_settings
from app.identity.ledger import UsageLedger
from app.identity.models import TokenUsage
from app.identity.principal import Principal

log = structlog.get_logger(__name__)

KEY_PREFIX = "quota:"

# KEYS[1] counter hash; ARGV: tokens, limit, ttl, seed ("" = none), new epoch.
# Returns {status, used, epoch}: status 1 admitted, 0 over quota, -1 counter missing (send a seed).
_RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[4] == '' then return {-1, 0, ''} end
  redis.call('HSET', KEYS[1], 'used', ARGV[4], 'epoch', ARGV[5])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
local used = tonumber(redis.call('HGET', KEYS[1], 'used'))
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return {0, used, epoch} end
return {1, redis.call('HINCRBY', KEYS[1], 'used', ARGV[1]), epoch}
"""

# KEYS[1] counter hash; ARGV: epoch of the reservation, reserved, actual.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  return redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[3]) - tonumber(ARGV[2]))
end
return redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[3]))
"""


class CounterStore(Protocol):
    def reserve(
        self, key: str, tokens: int, limit: int, ttl: int, seed: int | None
    ) -> tuple[int, int, str]: ...

    def adjust(self, key: str, epoch: str, reserved: int, actual: int) -> None: ...

    def drop(self, key: str) -> None: ...

    def peek(self, key: str) -> int | None: ...


class RedisCounters:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)

    def reserve(self, key: str, tokens: int, limit: int, ttl: int, seed: int | None) -> tuple[int, int, str]:
        status, used, epoch = self._reserve(
            keys=[key], args=[tokens, limit, ttl, "" if seed is None else seed, uuid.uuid4().hex]
        )
        return int(status), int(used), str(epoch)

    def adjust(self, key: str, epoch: str, reserved: int, actual: int) -> None:
        self._settle(keys=[key], args=[epoch, reserved, actual])

    def drop(self, key: str) -> None:
        self.redis.delete(key)

    def peek(self, key: str) -> int | None:
        used = self.redis.hget(key, "used")
        return None if used is None else int(used)


class LocalCounters:
    """The same semantics in one process, for running without Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, list] = {}

    def reserve(self, key: str, tokens: int, limit: int, ttl: int, seed: int | None) -> tuple[int, int, str]:
        with self._lock:
            if key not in self._counters:
                if seed is None:
                    return -1, 0, ""
                self._counters[key] = [seed, uuid.uuid4().hex]
            counter = self._counters[key]
            if counter[0] + tokens > limit:
                return 0, counter[0], counter[1]
            counter[0] += tokens
            return 1, counter[0], counter[1]

    def adjust(self, key: str, epoch: str, reserved: int, actual: int) -> None:
        with self._lock:
            counter = self._counters.get(key)
            if counter is not None:
                counter[0] += actual - reserved if counter[1] == epoch else actual

    def drop(self, key: str) -> None:
        with self._lock:
            self._counters.pop(key, None)

    def peek(self, key: str) -> int | None:
        counter = self._counters.get(key)
        return None if counter is None else counter[0]


def period_key(period: str, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("%Y-%m") if period == "month" else now.strftime("%Y-%m-%d")


def _seconds_left(period: str, now: datetime | None = None) -> int:
    now = now or datetime.now(UTC)
    days = calendar.monthrange(now.year, now.month)[1] - now.day + 1 if period == "month" else 1
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((midnight.timestamp() + days * 86400) - now.timestamp()))


@dataclass
class Reservation:
    """Tokens held for one request; settle with the real count, or release."""

    tenant_id: str
    period: str
    tokens: int
    epoch: str | None
    _app: Flask = field(repr=False)
    _done: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def settle(self, actual_tokens: int) -> None:
        """Count `actual_tokens` (may exceed the reservation: usage is real) and record it."""
        if actual_tokens < 0:
            raise ValueError("actual_tokens must be >= 0")
        if not self._finish():
            return
        with self._app.app_context():
            if self.epoch is not None:
                self._adjust(actual_tokens)
            if actual_tokens:
                _ledger().add(self.tenant_id, self.period, actual_tokens)

    def release(self) -> None:
        """Give the whole reservation back; a no-op after settle or a previous release."""
        if not self._finish() or self.epoch is None:
            return
        with self._app.app_context():
            self._adjust(0)

    def _finish(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
            return True

    def _adjust(self, actual: int) -> None:
        try:
            _store().adjust(_key(self.tenant_id, self.period), self.epoch or "", self.tokens, actual)
        except RedisError as exc:
            # The counter keeps this reservation (erring towards refusing, never overspending) until
            # `reconcile` or the period's end; the ledger below is exact either way.
            log.warning("quota_adjust_failed", tenant=self.tenant_id, error=str(exc))


@tracing.step("quota")
def reserve(principal: Principal, tokens: int) -> Reservation:
    """Hold `tokens` of the principal's tenant quota for this period, or raise 429 `insufficient_quota`."""
    if tokens < 0:
        raise ValueError("tokens must be >= 0")
    settings = tenant_settings(principal.tenant_id)
    if settings is None:
        raise APIError(403, "This tenant does not exist.", code="tenant_disabled")
    period = period_key(settings.quota_period)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if settings.token_quota is None:
        return Reservation(principal.tenant_id, period, tokens, None, app)
    key = _key(principal.tenant_id, period)
    ttl = _seconds_left(settings.quota_period) + 3600
    try:
        status, used, epoch = _store().reserve(key, tokens, settings.token_quota, ttl, None)
        if status == -1:
            seed = persisted_usage(principal.tenant_id, period)
            status, used, epoch = _store().reserve(key, tokens, settings.token_quota, ttl, seed)
    except RedisError as exc:
        log.error("quota_unavailable", tenant=principal.tenant_id, error=str(exc))
        raise APIError(
            503,
            "Token quotas cannot be checked right now; retry shortly.",
            code="quota_unavailable",
            headers={"Retry-After": "1"},
        ) from exc
    if status != 1:
        raise APIError(
            429,
            f"Token quota exceeded: {used} of {settings.token_quota} tokens used this "
            f"{settings.quota_period}, and this request may need {tokens}.",
            code="insufficient_quota",
            type="insufficient_quota",
            headers={"Retry-After": str(_seconds_left(settings.quota_period))},
        )
    return Reservation(principal.tenant_id, period, tokens, epoch, app)


def persisted_usage(tenant_id: str, period: str) -> int:
    """The ledger's total, this worker's unflushed sums included (they are flushed first)."""
    _ledger().flush()
    with db.engine.connect() as conn:
        tokens = conn.execute(
            select(TokenUsage.tokens).where(TokenUsage.tenant_id == tenant_id, TokenUsage.period == period)
        ).scalar()
    return int(tokens or 0)


def reconcile(tenant_id: str) -> int:
    """Rebuild the tenant's counter for this period from the ledger now; returns the ledger's total.

    `reserve` does the same by itself when the counter is missing; call this after restoring Redis
    from an old snapshot, whose counter exists but is stale. The counter forgets in-flight
    reservations; they still settle into the ledger as they finish.
    """
    settings = tenant_settings(tenant_id)
    if settings is None:
        return 0
    period = period_key(settings.quota_period)
    settled = persisted_usage(tenant_id, period)
    key = _key(tenant_id, period)
    _store().drop(key)
    _store().reserve(key, 0, settled, _seconds_left(settings.quota_period) + 3600, settled)
    return settled


def counted(tenant_id: str) -> int | None:
    """The live counter for this period (settled plus reserved), or None if it has not been built."""
    settings = tenant_settings(tenant_id)
    if settings is None:
        return None
    return _store().peek(_key(tenant_id, period_key(settings.quota_period)))


def _key(tenant_id: str, period: str) -> str:
    return f"{KEY_PREFIX}{tenant_id}:{period}"


def _store() -> CounterStore:
    return current_app.extensions["quota_counters"]


def _ledger() -> UsageLedger:
    return current_app.extensions["usage_ledger"]


def init_app(app: Flask) -> None:
    redis = app.extensions.get("redis_client")
    app.extensions["quota_counters"] = RedisCounters(redis) if redis is not None else LocalCounters()
    app.extensions["usage_ledger"] = UsageLedger(app, float(app.config["USAGE_LEDGER_FLUSH_S"]))
