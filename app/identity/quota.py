"""Token quotas per tenant and period (day or month, UTC): reserve, then settle or release.

`reserve(principal, max_tokens)` admits a request only if the tenant's counter plus `max_tokens`
fits its `token_quota`; the check-and-add is one Lua script, so concurrent requests on any
number of workers can never overshoot. `Reservation.settle(actual)` replaces the reservation with
the tokens really used and adds them to the `token_usage` ledger (batched: see ledger.py);
`release()` gives the reservation back (failure, client disconnect). Whichever of the two runs
first wins; later calls are no-ops, so `try: ... settle(n) finally: release()` is the intended pattern.

Reservations are leases. Each one is also a member `<id>:<tokens>` of a sorted set beside the
counter, scored by its deadline (Redis's own clock, so workers' clocks don't matter). A worker
killed mid-request (OOM, `kill -9`, a heartbeat timeout) never settles nor releases, so without
leases its tokens would stay counted until the period ends, locking the tenant out of capacity it
paid for. Every script that reads the counter (reserve, `counted`) first reclaims the leases whose
deadline has passed, atomically with what it then does, so the counter comes back to the ledger
within QUOTA_LEASE_SECONDS of the death, with no sweeper process.

The deadline is a heartbeat rather than a fixed "request deadline plus a margin": a request has
no bounded deadline here (streams last as long as the client reads, local generation as long as
max_tokens takes), and a fixed one would either reclaim a live request (letting the tenant
overspend) or keep a dead one's tokens for as long as the longest request could last. So each
process renews its live leases every third of the lease time, in one script call per counter
(`LeaseKeeper`); a lease outlives its process by at most QUOTA_LEASE_SECONDS. The keeper holds
reservations weakly, so one dropped without settling (a bug) stops being renewed and is
reclaimed too. Settling removes the lease in the same script that adjusts the counter: if the
lease was still there, the counter held the reservation and gets `actual - reserved`; if it was
already reclaimed (or the counter was rebuilt since), only `actual` is added. One membership test
decides, so a reservation is never given back twice.

The database is the ledger and Redis a counter of ledger plus in-flight reservations: when the
Redis key is missing (first use in a period, or Redis restarted or flushed) it is rebuilt from the
ledger before the reservation is counted, and the old leases are dropped with it, so a restart
loses no settled usage.

Without REDIS_URL the counter lives in the process (one worker; the dev default). If Redis is
configured but unreachable, tenants with a quota get 503 `quota_unavailable`: admitting unmetered
spend is worse than a short refusal. Tenants without a quota are never blocked; their usage is
still recorded.
"""

from __future__ import annotations

import calendar
import threading
import time
import uuid
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog
from flask import Flask, current_app
from redis import Redis
from redis.exceptions import NoScriptError, RedisError
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
LEASES_SUFFIX = ":leases"
# How long a settlement may wait for this worker's next reservation to carry it to Redis.
SETTLE_DELAY_S = 0.05

# Shared by the scripts below: give back every lease of KEYS[2] whose deadline has passed.
_RECLAIM = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reclaim(counter, leases, now)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  if #expired == 0 then return 0 end
  local tokens = 0
  for _, member in ipairs(expired) do
    tokens = tokens + tonumber(string.match(member, ':(%d+)$'))
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('EXISTS', counter) == 1 then redis.call('HINCRBY', counter, 'used', -tokens) end
  return #expired
end
"""

# The settlements a worker has queued, then one reservation, in one call (see RedisCounters).
# KEYS: counter hash and leases of each settlement, then of the reservation. ARGV: the number of
# settlements, (member, reserved, actual) for each, then the reservation's tokens, limit, ttl,
# seed ("" = none), member, lease ms. Returns {status, used, reclaimed}: status 1 admitted,
# 0 over quota, -1 counter missing (send a seed). A settlement is _SETTLE below, inlined.
_SETTLE_AND_RESERVE = (
    _RECLAIM
    + """
local settlements = tonumber(ARGV[1])
for i = 1, settlements do
  local counter, leases = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('EXISTS', counter) == 1 then
    local reserved, actual = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
    if redis.call('ZREM', leases, ARGV[3 * i - 1]) == 1 then
      redis.call('HINCRBY', counter, 'used', actual - reserved)
    else
      redis.call('HINCRBY', counter, 'used', actual)
    end
  end
end
local counter, leases = KEYS[2 * settlements + 1], KEYS[2 * settlements + 2]
local a = 3 * settlements + 1
local tokens, limit, ttl = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
local seed, member, lease_ms = ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6])
local now = now_ms()
if redis.call('EXISTS', counter) == 0 then
  if seed == '' then return {-1, 0, 0} end
  redis.call('DEL', leases)
  redis.call('HSET', counter, 'used', seed)
  redis.call('EXPIRE', counter, ttl)
end
local reclaimed = reclaim(counter, leases, now)
local used = tonumber(redis.call('HGET', counter, 'used'))
if used + tokens > limit then return {0, used, reclaimed} end
if tokens > 0 then
  redis.call('ZADD', leases, now + lease_ms, member)
  redis.call('EXPIRE', leases, ttl)
end
return {1, redis.call('HINCRBY', counter, 'used', tokens), reclaimed}
"""
)

# KEYS[1] counter hash, KEYS[2] leases; ARGV: member, reserved, actual.
_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  return redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[3]) - tonumber(ARGV[2]))
end
return redis.call('HINCRBY', KEYS[1], 'used', tonumber(ARGV[3]))
"""

# KEYS[1] counter hash, KEYS[2] leases. Returns {used or -1 when missing, reclaimed}.
_PEEK = (
    _RECLAIM
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local reclaimed = reclaim(KEYS[1], KEYS[2], now_ms())
return {tonumber(redis.call('HGET', KEYS[1], 'used')), reclaimed}
"""
)

# KEYS[1] leases; ARGV: lease ms, members... XX: a lease already reclaimed is never brought back.
_RENEW = """
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', deadline, ARGV[i])
end
return renewed
"""


class CounterStore(Protocol):
    def reserve(
        self, key: str, tokens: int, limit: int, ttl: int, seed: int | None, member: str, lease_s: float
    ) -> tuple[int, int, int]: ...

    def adjust(self, key: str, member: str, reserved: int, actual: int) -> None: ...

    def renew(self, key: str, members: list[str], lease_s: float) -> None: ...

    def drop(self, key: str) -> None: ...

    def peek(self, key: str) -> tuple[int | None, int]: ...


class RedisCounters:
    """The scripts above on one Redis, with settlements batched into this worker's next round trip.

    A settlement only ever lowers the counter towards what was really used (or raises it by usage
    beyond the reservation, already spent), so it need not reach Redis before the response: it is
    queued and sent in the same script call as this worker's next reservation, or by a flusher within
    SETTLE_DELAY_S when no reservation comes. A request then costs one quota round trip, not two.
    Until it lands the counter still holds the reservation, erring towards refusing, never towards
    overspending; this worker's own next reservation always sees it (it is sent first, in order),
    other workers within SETTLE_DELAY_S. Reads (`peek`, `drop`) send the queue first, so they are exact.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._reserve = redis.register_script(_SETTLE_AND_RESERVE)
        self._settle = redis.register_script(_SETTLE)
        self._peek = redis.register_script(_PEEK)
        self._renew = redis.register_script(_RENEW)
        self._queued: list[tuple[str, str, int, int]] = []
        self._queue_lock = threading.Lock()
        self._work = threading.Event()
        self._flusher_started = False

    def reserve(
        self, key: str, tokens: int, limit: int, ttl: int, seed: int | None, member: str, lease_s: float
    ) -> tuple[int, int, int]:
        queued = self._take()
        keys: list[str] = []
        args: list[object] = [len(queued)]
        for settled_key, settled_member, reserved, actual in queued:
            keys += [settled_key, settled_key + LEASES_SUFFIX]
            args += [settled_member, reserved, actual]
        keys += [key, key + LEASES_SUFFIX]
        args += [tokens, limit, ttl, "" if seed is None else seed, member, int(lease_s * 1000)]
        try:
            status, used, reclaimed = self._reserve(keys=keys, args=args)
        except RedisError as exc:
            if queued:
                log.warning("quota_adjust_failed", settlements=len(queued), error=str(exc))
            raise
        return int(status), int(used), int(reclaimed)

    def adjust(self, key: str, member: str, reserved: int, actual: int) -> None:
        """Queued; see the class docstring."""
        with self._queue_lock:
            self._queued.append((key, member, reserved, actual))
            start = not self._flusher_started
            self._flusher_started = True
        self._work.set()
        if start:
            # A greenlet under gunicorn's gevent worker, a daemon thread elsewhere; held weakly.
            threading.Thread(
                target=_send_settlements, args=(weakref.ref(self), self._work), daemon=True
            ).start()

    def flush(self) -> None:
        """Send the queued settlements now."""
        queued = self._take()
        if queued:
            self._send(queued)

    def renew(self, key: str, members: list[str], lease_s: float) -> None:
        self._renew(keys=[key + LEASES_SUFFIX], args=[int(lease_s * 1000), *members])

    def drop(self, key: str) -> None:
        self.flush()
        self.redis.delete(key, key + LEASES_SUFFIX)

    def peek(self, key: str) -> tuple[int | None, int]:
        self.flush()
        used, reclaimed = self._peek(keys=[key, key + LEASES_SUFFIX])
        return (None if int(used) < 0 else int(used)), int(reclaimed)

    def _take(self) -> list[tuple[str, str, int, int]]:
        with self._queue_lock:
            queued, self._queued = self._queued, []
        return queued

    def _send(self, queued: list[tuple[str, str, int, int]]) -> None:
        """The flusher's round trip: the settlements no reservation has carried, pipelined.

        EVALSHA in a plain pipeline, not redis-py's pipelined Script, which first asks SCRIPT EXISTS
        (a round trip of its own). A script Redis does not know (it restarted) is sent again through
        its Script object, which loads it; a settlement that fails otherwise is logged, as a lease
        then gives its tokens back (see the module docstring).
        """
        pipe = self.redis.pipeline(transaction=False)
        for key, member, reserved, actual in queued:
            pipe.evalsha(self._settle.sha, 2, key, key + LEASES_SUFFIX, member, reserved, actual)
        try:
            results = pipe.execute(raise_on_error=False)
        except RedisError as exc:
            log.warning("quota_adjust_failed", settlements=len(queued), error=str(exc))
            raise
        for (key, member, reserved, actual), result in zip(queued, results, strict=True):
            if isinstance(result, NoScriptError):
                result = self._settle(keys=[key, key + LEASES_SUFFIX], args=[member, reserved, actual])
            if isinstance(result, Exception):
                log.warning("quota_adjust_failed", settlements=1, error=str(result))


def _send_settlements(ref: weakref.ref[RedisCounters], work: threading.Event) -> None:
    """The flusher: settlements no reservation has carried go within SETTLE_DELAY_S."""
    while True:
        woken = work.wait(1.0)
        counters = ref()
        if counters is None:
            return
        if woken:
            work.clear()
            time.sleep(SETTLE_DELAY_S)  # let a reservation carry them, or gather a batch
            try:
                counters.flush()
            except RedisError:
                pass  # logged by _send; the leases give the tokens back
            except Exception:  # the loop must outlive one bad pass; the traceback goes to the log
                log.exception("quota_settlement_error")
        del counters


@dataclass
class _LocalCounter:
    used: int
    leases: dict[str, tuple[float, int]] = field(default_factory=dict)  # member -> (deadline, tokens)

    def reclaim(self, now: float) -> int:
        expired = [member for member, (deadline, _) in self.leases.items() if deadline <= now]
        for member in expired:
            self.used -= self.leases.pop(member)[1]
        return len(expired)


class LocalCounters:
    """The same semantics in one process, for running without Redis."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, _LocalCounter] = {}

    def reserve(
        self, key: str, tokens: int, limit: int, ttl: int, seed: int | None, member: str, lease_s: float
    ) -> tuple[int, int, int]:
        now = time.monotonic()
        with self._lock:
            if key not in self._counters:
                if seed is None:
                    return -1, 0, 0
                self._counters[key] = _LocalCounter(seed)
            counter = self._counters[key]
            reclaimed = counter.reclaim(now)
            if counter.used + tokens > limit:
                return 0, counter.used, reclaimed
            counter.used += tokens
            if tokens:
                counter.leases[member] = (now + lease_s, tokens)
            return 1, counter.used, reclaimed

    def adjust(self, key: str, member: str, reserved: int, actual: int) -> None:
        with self._lock:
            counter = self._counters.get(key)
            if counter is not None:
                counter.used += actual - reserved if counter.leases.pop(member, None) else actual

    def renew(self, key: str, members: list[str], lease_s: float) -> None:
        deadline = time.monotonic() + lease_s
        with self._lock:
            counter = self._counters.get(key)
            for member in members if counter is not None else ():
                if member in counter.leases:  # type: ignore[union-attr]
                    counter.leases[member] = (deadline, counter.leases[member][1])  # type: ignore[union-attr]

    def drop(self, key: str) -> None:
        with self._lock:
            self._counters.pop(key, None)

    def peek(self, key: str) -> tuple[int | None, int]:
        with self._lock:
            counter = self._counters.get(key)
            if counter is None:
                return None, 0
            reclaimed = counter.reclaim(time.monotonic())
            return counter.used, reclaimed


class LeaseKeeper:
    """Renews this process's live leases every third of the lease time, one call per counter.

    While the process lives its leases never expire; once it dies, nobody renews them and the next
    read of the counter reclaims them. Held weakly: see the module docstring.
    """

    def __init__(self, app: Flask, lease_s: float) -> None:
        self._app = app
        self.lease_s = lease_s
        self._live: weakref.WeakValueDictionary[str, Reservation] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False

    def hold(self, reservation: Reservation) -> None:
        with self._lock:
            self._live[reservation.member] = reservation
            start = not self._started
            self._started = True
        if start:
            # A greenlet under gunicorn's gevent worker, a daemon thread elsewhere; it holds the
            # keeper weakly, so a discarded app (tests) lets it end.
            threading.Thread(target=_keep, args=(weakref.ref(self), self._stop), daemon=True).start()

    def forget(self, reservation: Reservation) -> None:
        with self._lock:
            self._live.pop(reservation.member, None)

    def renew(self) -> None:
        """One pass: extend every live lease by a full lease time from now."""
        by_counter: dict[str, list[str]] = defaultdict(list)
        with self._lock:
            for member, reservation in list(self._live.items()):
                by_counter[reservation.key].append(member)
        if not by_counter:
            return
        with self._app.app_context():
            for key, members in by_counter.items():
                try:
                    _store().renew(key, members, self.lease_s)
                except RedisError as exc:
                    # Late by one pass at most; a lease missed for a whole lease time is reclaimed,
                    # and its settle then adds only what it used, so accounting stays exact.
                    log.warning("quota_lease_renewal_failed", leases=len(members), error=str(exc))

    def close(self) -> None:
        self._stop.set()


def _keep(ref: weakref.ref[LeaseKeeper], stop: threading.Event) -> None:
    while True:
        keeper = ref()
        if keeper is None:
            return
        interval = keeper.lease_s / 3
        del keeper
        if stop.wait(interval):
            return
        keeper = ref()
        if keeper is None:
            return
        try:
            keeper.renew()
        except Exception:  # the loop must outlive one bad pass; the traceback goes to the log
            log.exception("quota_lease_renewal_error")
        del keeper


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
    """Tokens held for one request; settle with the real count, or release.

    `key` is the counter's key, None for a tenant without a quota (nothing is counted in Redis);
    `member` names this reservation's lease.
    """

    tenant_id: str
    period: str
    tokens: int
    key: str | None
    member: str
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
            if self.key is not None:
                self._adjust(actual_tokens)
            if actual_tokens:
                _ledger().add(self.tenant_id, self.period, actual_tokens)

    def release(self) -> None:
        """Give the whole reservation back; a no-op after settle or a previous release."""
        if not self._finish() or self.key is None:
            return
        with self._app.app_context():
            self._adjust(0)

    def _finish(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
        if self.key is not None and self.tokens:
            self._app.extensions["quota_leases"].forget(self)
        return True

    def _adjust(self, actual: int) -> None:
        try:
            _store().adjust(self.key or "", self.member, self.tokens, actual)
        except RedisError as exc:
            # The counter keeps this reservation (erring towards refusing, never overspending) until
            # its lease expires (QUOTA_LEASE_SECONDS) and is reclaimed; the ledger below is exact.
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
    member = f"{uuid.uuid4().hex}:{tokens}"
    if settings.token_quota is None:
        return Reservation(principal.tenant_id, period, tokens, None, member, app)
    key = _key(principal.tenant_id, period)
    ttl = _seconds_left(settings.quota_period) + 3600
    keeper: LeaseKeeper = app.extensions["quota_leases"]
    try:
        status, used, reclaimed = _store().reserve(
            key, tokens, settings.token_quota, ttl, None, member, keeper.lease_s
        )
        if status == -1:
            seed = persisted_usage(principal.tenant_id, period)
            status, used, reclaimed = _store().reserve(
                key, tokens, settings.token_quota, ttl, seed, member, keeper.lease_s
            )
    except RedisError as exc:
        log.error("quota_unavailable", tenant=principal.tenant_id, error=str(exc))
        raise APIError(
            503,
            "Token quotas cannot be checked right now; retry shortly.",
            code="quota_unavailable",
            headers={"Retry-After": "1"},
        ) from exc
    _log_reclaimed(principal.tenant_id, reclaimed)
    if status != 1:
        raise APIError(
            429,
            f"Token quota exceeded: {used} of {settings.token_quota} tokens used this "
            f"{settings.quota_period}, and this request may need {tokens}.",
            code="insufficient_quota",
            type="insufficient_quota",
            headers={"Retry-After": str(_seconds_left(settings.quota_period))},
        )
    reservation = Reservation(principal.tenant_id, period, tokens, key, member, app)
    if tokens:
        keeper.hold(reservation)
    return reservation


def _log_reclaimed(tenant_id: str, reclaimed: int) -> None:
    if reclaimed:
        # Reservations whose holder stopped renewing them: a worker died mid-request.
        log.warning("quota_leases_reclaimed", tenant=tenant_id, leases=reclaimed)


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
    reservations and their leases; they still settle into the ledger as they finish.
    """
    settings = tenant_settings(tenant_id)
    if settings is None:
        return 0
    period = period_key(settings.quota_period)
    settled = persisted_usage(tenant_id, period)
    key = _key(tenant_id, period)
    _store().drop(key)
    _store().reserve(key, 0, settled, _seconds_left(settings.quota_period) + 3600, settled, "", 0)
    return settled


def counted(tenant_id: str) -> int | None:
    """The live counter for this period (settled plus reserved, expired leases reclaimed first),
    or None if it has not been built."""
    settings = tenant_settings(tenant_id)
    if settings is None:
        return None
    used, reclaimed = _store().peek(_key(tenant_id, period_key(settings.quota_period)))
    _log_reclaimed(tenant_id, reclaimed)
    return used


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
    app.extensions["quota_leases"] = LeaseKeeper(app, float(app.config["QUOTA_LEASE_S"]))
