"""Token quotas: atomic reservations under concurrency, settle/release, the ledger, reconcile after a
Redis flush, and the in-process fallback. Run against Redis and the fallback, on both engines."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import redis

from app.errors import APIError
from app.identity import accounts, quota
from app.identity.principal import Principal
from tests import support


@pytest.fixture(params=["redis", "local"])
def app_env(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "local":
        return {}
    url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(url)
    return {"REDIS_URL": url}


@pytest.fixture
def database_url(any_database_url: str) -> str:
    return any_database_url


def tenant_principal(app, token_quota: int | None, period: str = "day") -> Principal:
    with app.app_context():
        tenant = accounts.create_tenant(
            f"t{token_quota}-{period}", token_quota=token_quota, quota_period=period
        )
        return Principal(
            tenant_id=tenant.id,
            subject="key:k",
            kind="api_key",
            scopes=frozenset({"inference:invoke"}),
            key_id="k",
            user_id=None,
        )


def lose_counters(app) -> None:
    """What a Redis restart (or, without Redis, a process restart) does to the counters."""
    redis_url = app.config.get("REDIS_URL")
    if redis_url:
        redis.Redis.from_url(redis_url).flushdb()
    else:
        app.extensions["quota_counters"]._counters.clear()


def test_concurrent_reservations_never_exceed_the_quota(app):
    principal = tenant_principal(app, token_quota=30)
    start = threading.Barrier(100)

    def reserve(_: int) -> quota.Reservation | str:
        with app.app_context():
            start.wait()
            try:
                return quota.reserve(principal, 1)
            except APIError as exc:
                return f"{exc.status} {exc.code}"

    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(reserve, range(100)))
    admitted = [r for r in results if isinstance(r, quota.Reservation)]
    assert len(admitted) == 30
    assert [r for r in results if isinstance(r, str)] == ["429 insufficient_quota"] * 70
    with app.app_context():
        assert quota.counted(principal.tenant_id) == 30
        for reservation in admitted[:10]:
            reservation.settle(1)
        for reservation in admitted[10:]:
            reservation.release()
        assert quota.counted(principal.tenant_id) == 10
        assert quota.persisted_usage(principal.tenant_id, quota.period_key("day")) == 10


def test_settle_and_release_restore_the_counter(app):
    principal = tenant_principal(app, token_quota=100)
    with app.app_context():
        first = quota.reserve(principal, 40)
        assert quota.counted(principal.tenant_id) == 40
        first.settle(15)
        assert quota.counted(principal.tenant_id) == 15
        first.release()  # after settle: no-op
        first.settle(99)  # settled already: no-op
        assert quota.counted(principal.tenant_id) == 15
        second = quota.reserve(principal, 50)
        second.release()
        second.release()
        assert quota.counted(principal.tenant_id) == 15
        third = quota.reserve(principal, 10)
        third.settle(30)  # usage above the reservation is real and counted
        assert quota.counted(principal.tenant_id) == 45
        assert quota.persisted_usage(principal.tenant_id, quota.period_key("day")) == 45
        with pytest.raises(APIError) as info:
            quota.reserve(principal, 56)
        assert info.value.status == 429 and info.value.code == "insufficient_quota"
        assert info.value.type == "insufficient_quota" and int(info.value.headers["Retry-After"]) > 0
        quota.reserve(principal, 55).release()


def test_lost_counters_are_rebuilt_from_the_ledger(app):
    principal = tenant_principal(app, token_quota=50)
    with app.app_context():
        quota.reserve(principal, 20).settle(20)
        in_flight = quota.reserve(principal, 10)
        lose_counters(app)
        assert quota.counted(principal.tenant_id) is None
        assert quota.reconcile(principal.tenant_id) == 20
        assert quota.counted(principal.tenant_id) == 20
        # A reservation made before the loss adds only what it used: the rebuilt counter never held it.
        in_flight.settle(4)
        assert quota.counted(principal.tenant_id) == 24
        lose_counters(app)
        # Without an explicit reconcile, the next reservation rebuilds the counter itself.
        with pytest.raises(APIError):
            quota.reserve(principal, 27)
        quota.reserve(principal, 26).release()
        assert quota.counted(principal.tenant_id) == 24
        assert quota.persisted_usage(principal.tenant_id, quota.period_key("day")) == 24


def test_unlimited_tenants_are_never_refused_but_their_usage_is_recorded(app):
    principal = tenant_principal(app, token_quota=None)
    with app.app_context():
        quota.reserve(principal, 10**9).settle(7)
        quota.reserve(principal, 5).release()
        assert quota.counted(principal.tenant_id) is None
        assert quota.persisted_usage(principal.tenant_id, quota.period_key("day")) == 7


def test_monthly_quota_uses_a_month_ledger_row(app):
    principal = tenant_principal(app, token_quota=10, period="month")
    with app.app_context():
        quota.reserve(principal, 3).settle(3)
        assert quota.persisted_usage(principal.tenant_id, quota.period_key("month")) == 3
    assert quota.period_key("month", datetime(2026, 2, 28, 23, 59, tzinfo=UTC)) == "2026-02"
    assert quota.period_key("day", datetime(2026, 2, 28, 23, 59, tzinfo=UTC)) == "2026-02-28"


def test_quota_refuses_with_503_when_redis_is_down(monkeypatch, sqlite_url):
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    from app import create_app

    app = create_app()
    limited = tenant_principal(app, token_quota=10)
    unlimited = tenant_principal(app, token_quota=None)
    with app.app_context():
        with pytest.raises(APIError) as info:
            quota.reserve(limited, 1)
        assert info.value.status == 503 and info.value.code == "quota_unavailable"
        quota.reserve(unlimited, 1).settle(1)  # no quota, no Redis needed
