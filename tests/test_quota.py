"""Token quotas: atomic reservations under concurrency, settle/release, the ledger, reconcile after a
Redis flush, and the in-process fallback. Run against Redis and the fallback, on both engines; and
end to end on a real 2-worker gunicorn in front of the upstream simulator (acceptance 3)."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest
import redis
import requests
from sqlalchemy import text as sql_text

from app.errors import APIError
from app.identity import accounts, quota
from app.identity.principal import Principal
from app.inference.service import token_bound
from bench.upstream_sim import Simulator, run_simulator
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


def _ledger_row(app, tenant_id: str) -> int | None:
    from sqlalchemy import select

    from app.extensions import db
    from app.identity.models import TokenUsage

    with app.app_context(), db.engine.connect() as conn:
        return conn.execute(select(TokenUsage.tokens).where(TokenUsage.tenant_id == tenant_id)).scalar()


def test_the_ledger_is_written_once_per_flush_not_once_per_request(app, monkeypatch):
    """100 settles from 20 threads become one upsert of their sum; a failed flush keeps its sums."""
    from sqlalchemy.exc import OperationalError

    from app.identity import ledger as ledger_module

    principal = tenant_principal(app, token_quota=None)
    ledger = app.extensions["usage_ledger"]
    ledger.interval_s = 3600  # only explicit flushes in this test
    writes: list[int] = []
    upsert = ledger_module._upsert
    monkeypatch.setattr(
        ledger_module, "_upsert", lambda conn, pending: (writes.append(1), upsert(conn, pending))
    )

    def settle(_: int) -> None:
        with app.app_context():
            quota.reserve(principal, 5).settle(3)

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(settle, range(100)))
    assert _ledger_row(app, principal.tenant_id) is None and writes == []  # nothing on the request path
    ledger.flush()
    assert _ledger_row(app, principal.tenant_id) == 300 and writes == [1]

    def down(conn, pending):
        raise OperationalError("INSERT", {}, Exception("database is down"))

    monkeypatch.setattr(ledger_module, "_upsert", down)
    with app.app_context():
        quota.reserve(principal, 5).settle(4)
    ledger.flush()
    assert _ledger_row(app, principal.tenant_id) == 300  # not written, and not lost:
    monkeypatch.setattr(ledger_module, "_upsert", upsert)
    with app.app_context():
        assert quota.persisted_usage(principal.tenant_id, quota.period_key("day")) == 304


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


def test_flask_quota_reconcile_repairs_a_stale_counter(app, runner):
    """Redis restored from an old snapshot: its counter exists but forgot settled usage."""
    principal = tenant_principal(app, token_quota=50)
    with app.app_context():
        quota.reserve(principal, 40).settle(40)
        key = f"{quota.KEY_PREFIX}{principal.tenant_id}:{quota.period_key('day')}"
        store = app.extensions["quota_counters"]
        if app.config.get("REDIS_URL"):
            store.redis.hset(key, "used", 0)
        else:
            store._counters[key].used = 0
        assert quota.counted(principal.tenant_id) == 0  # would admit 50 more
    result = runner.invoke(args=["quota", "reconcile"])
    assert result.exit_code == 0, result.output
    assert "40 tokens settled" in result.output
    with app.app_context():
        assert quota.counted(principal.tenant_id) == 40
        with pytest.raises(APIError):
            quota.reserve(principal, 11)


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


# --- acceptance 3, end to end ---------------------------------------------------------------------

MAX_TOKENS = 10
FITS = 30
CHAT = "/v1/chat/completions"


class QuotaServer:
    """A 2-worker gateway serving only the simulator's model, and a reader of one tenant's quota."""

    def __init__(self, server: support.GunicornServer, database_url: str, redis_url: str) -> None:
        self.server = server
        self.database_url = database_url
        self.redis = redis.Redis.from_url(redis_url)

    def tenant(self, name: str, token_quota: int) -> tuple[str, str]:
        """(tenant id, API key) of a new tenant whose rate limit stays out of the way."""
        key = support.issue_key(self.database_url, name, rate_limit="100000/minute", token_quota=token_quota)
        with psycopg.connect(self.database_url) as conn:
            (tenant_id,) = conn.execute("SELECT id FROM tenants WHERE name = %s", (name,)).fetchone()
        return tenant_id, key

    def chat(self, key: str, stream: bool = False, max_tokens: int = MAX_TOKENS) -> requests.Response:
        body = {"model": "upstream-chat", "max_tokens": max_tokens, "stream": stream}
        return requests.post(
            self.server.url + CHAT,
            json={**body, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}", "Connection": "close"},
            stream=stream,
            timeout=60,
        )

    def abandon_stream(self, key: str, max_tokens: int) -> None:
        """Open a chat stream on a raw socket, read until generation is under way, then hang up."""
        body = json.dumps(
            {
                "model": "upstream-chat",
                "max_tokens": max_tokens,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ).encode()
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=30) as sock:
            sock.sendall(head + body)
            received = b""
            while b" tok1" not in received:
                data = sock.recv(4096)
                assert data, f"the stream ended before generation was under way: {received!r}"
                received += data
            assert received.startswith(b"HTTP/1.1 200")

    def counted(self, tenant_id: str) -> int:
        """The Redis counter: settled usage plus reservations still held."""
        used = self.redis.hget(f"{quota.KEY_PREFIX}{tenant_id}:{quota.period_key('day')}", "used")
        return int(used or 0)

    def recorded(self, tenant_id: str) -> int:
        """The ledger: settled usage only."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT tokens FROM token_usage WHERE tenant_id = %s", (tenant_id,)).fetchone()
        return int(row[0]) if row else 0

    def settled(self, tenant_id: str, timeout: float = 15.0) -> int:
        """The ledger once every reservation is settled or released: the counter equals it."""
        deadline = time.monotonic() + timeout
        while True:
            counted, recorded = self.counted(tenant_id), self.recorded(tenant_id)
            if counted == recorded or time.monotonic() > deadline:
                assert counted == recorded, f"counter {counted} holds reservations; ledger {recorded}"
                return recorded
            time.sleep(0.1)


@pytest.fixture
def quota_server(postgres_url: str, redis_url: str) -> Iterator[tuple[QuotaServer, Simulator]]:
    """PostgreSQL, since 100 settles at once from two processes are the ledger's real workload."""
    with run_simulator(latency_ms=300) as sim:
        env = {
            "DATABASE_URL": postgres_url,
            "REDIS_URL": redis_url,
            "MODELS_CONFIG": str(support.ROOT / "bench" / "models.yaml"),
            "UPSTREAM_BASE_URL": sim.base_url,
            "SSE_PING_INTERVAL": "0.2",
        }
        with support.GunicornServer(env, workers=2, ready_path="/readyz") as server:
            yield QuotaServer(server, postgres_url, redis_url), sim
            assert "Traceback" not in server.log()


def race(gateway: QuotaServer, tenant: str) -> tuple[str, int, list[requests.Response]]:
    """100 chats at once against a quota that fits 30: (tenant id, quota, admitted responses)."""
    # What one call really costs (the simulator's prompt count plus max_tokens), measured on a
    # tenant of its own. A call reserves more (the model can't count its prompt, so the bound);
    # what it doesn't use comes back and may admit a later call, but never a 31st.
    _, probe_key = gateway.tenant(f"{tenant}-probe", 10**9)
    cost = gateway.chat(probe_key).json()["usage"]["total_tokens"]
    token_quota = FITS * cost
    tenant_id, key = gateway.tenant(tenant, token_quota)
    start = threading.Barrier(100)

    def call(_: int) -> requests.Response:
        start.wait()
        return gateway.chat(key)

    with ThreadPoolExecutor(100) as pool:
        responses = list(pool.map(call, range(100)))
    admitted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert 0 < len(admitted) <= FITS
    assert {(r.status_code, r.json()["error"]["code"], r.json()["error"]["type"]) for r in refused} == {
        (429, "insufficient_quota", "insufficient_quota")
    }
    return tenant_id, token_quota, admitted


@pytest.mark.server
def test_concurrent_chats_admit_at_most_what_the_quota_fits(quota_server):
    """At most 30 admitted across both workers, the rest 429 insufficient_quota, and the ledger
    holds exactly the usage the admitted calls reported, with no reservation left behind."""
    gateway, _ = quota_server
    tenant_id, _, admitted = race(gateway, "quota-race")
    assert gateway.settled(tenant_id) == sum(r.json()["usage"]["total_tokens"] for r in admitted)


@pytest.mark.server
def test_concurrent_chats_record_no_more_than_the_quota(quota_server):
    gateway, _ = quota_server
    tenant_id, token_quota, _ = race(gateway, "quota-usage")
    assert gateway.settled(tenant_id) <= token_quota


@pytest.mark.server
def test_failed_and_disconnected_calls_give_their_reservations_back(quota_server):
    """A stream cut by the client or by the upstream settles only what was generated, a failed call
    releases its whole reservation: each time the counter comes back to the ledger exactly."""
    gateway, sim = quota_server
    token_quota = 20 * (token_bound(["hi"]) + MAX_TOKENS)  # room for every call below at once
    tenant_id, key = gateway.tenant("quota-faults", token_quota)

    sim.configure(latency_ms=0, tokens=200, tokens_per_s=20)
    for _ in range(3):
        gateway.abandon_stream(key, max_tokens=50)
    after_disconnects = gateway.settled(tenant_id)
    assert 0 < after_disconnects < 3 * 50, "only the tokens generated before the cuts count"

    sim.configure(fault="cut", fault_rate=1.0, tokens=MAX_TOKENS, tokens_per_s=0)
    cut_upstream = gateway.chat(key, stream=True)
    assert cut_upstream.status_code == 200 and b'"error"' in cut_upstream.content
    after_cut = gateway.settled(tenant_id)
    assert after_disconnects < after_cut < after_disconnects + MAX_TOKENS

    sim.configure(fault="500")  # the breaker opens on some of these: 503, also after the reservation
    with ThreadPoolExecutor(10) as pool:
        failed = list(pool.map(lambda _: gateway.chat(key), range(10)))
    assert {r.status_code for r in failed} <= {502, 503}
    assert gateway.settled(tenant_id) == after_cut <= token_quota


# --- leases: a reservation outlives a dead holder by at most QUOTA_LEASE_SECONDS ----------------


class TestLeases:
    """In-process, against Redis and the fallback: the keeper's thread is stopped, so each test
    decides when leases are renewed."""

    LEASE_S = 1.0

    @pytest.fixture(params=["redis", "local"])
    def app_env(self, request: pytest.FixtureRequest) -> dict[str, str]:
        env = {"QUOTA_LEASE_SECONDS": str(self.LEASE_S)}
        if request.param == "redis":
            env["REDIS_URL"] = request.getfixturevalue("redis_url")
        return env

    @pytest.fixture
    def database_url(self, sqlite_url: str) -> str:
        return sqlite_url

    def until_reclaimed(self, app, tenant_id: str, expected: int) -> float:
        """Seconds until the counter reads `expected`, polled through `counted` (which reclaims)."""
        started = time.monotonic()
        with app.app_context():
            while quota.counted(tenant_id) != expected:
                assert time.monotonic() - started < 10 * self.LEASE_S, quota.counted(tenant_id)
                time.sleep(0.05)
        return time.monotonic() - started

    def test_an_unrenewed_lease_is_reclaimed_and_its_late_settle_counts_once(self, app):
        principal = tenant_principal(app, token_quota=100)
        keeper = app.extensions["quota_leases"]
        keeper.close()
        with app.app_context():
            quota.reserve(principal, 10).settle(10)
            dead = quota.reserve(principal, 60)  # its holder "dies": nobody renews it
            assert quota.counted(principal.tenant_id) == 70
            with pytest.raises(APIError):
                quota.reserve(principal, 31)
        self.until_reclaimed(app, principal.tenant_id, 10)
        with app.app_context():
            # A settle arriving after the reclaim (a holder that was only slow) adds what it used,
            # nothing more: the reservation is not given back twice.
            dead.settle(7)
            assert quota.counted(principal.tenant_id) == 17
            assert quota.persisted_usage(principal.tenant_id, quota.period_key("day")) == 17
            quota.reserve(principal, 83).release()

    def test_a_renewed_lease_outlives_its_first_deadline(self, app):
        principal = tenant_principal(app, token_quota=100)
        keeper = app.extensions["quota_leases"]
        keeper.close()
        with app.app_context():
            live = quota.reserve(principal, 40)
        time.sleep(0.6 * self.LEASE_S)
        keeper.renew()  # what the keeper's loop does every third of the lease
        time.sleep(0.6 * self.LEASE_S)  # past the first deadline, before the renewed one
        with app.app_context():
            assert quota.counted(principal.tenant_id) == 40
            live.settle(25)
            assert quota.counted(principal.tenant_id) == 25
        keeper.renew()  # a settled reservation is no longer renewed, nor brought back
        with app.app_context():
            assert quota.counted(principal.tenant_id) == 25

    def test_a_reservation_dropped_without_settling_is_not_kept_alive(self, app):
        principal = tenant_principal(app, token_quota=100)
        keeper = app.extensions["quota_leases"]
        keeper.close()
        with app.app_context():
            quota.reserve(principal, 30)  # never settled nor released, and no longer referenced
        gc.collect()
        keeper.renew()
        self.until_reclaimed(app, principal.tenant_id, 0)


# --- a stream dropped before its first chunk --------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    with run_simulator(latency_ms=0) as sim:
        yield sim


class TestDroppedStream:
    """An after_request hook that fails turns a stream into a 500 before its first chunk: Flask
    discards our response unclosed, so no generator `finally` runs. The slot and the reservation
    must come back anyway."""

    @pytest.fixture
    def app_env(self, simulator: Simulator, redis_url: str, tmp_path) -> dict[str, str]:
        catalogue = tmp_path / "models.yaml"
        catalogue.write_text(
            "models:\n"
            "  - name: upstream-chat\n"
            "    backend: openai_compatible\n"
            "    params: {base_url: '${UPSTREAM_BASE_URL}', model: sim-model}\n"
            "    limits: {max_concurrency: 1, max_queue: 0}\n"  # one slot: a leak shows as a 503
        )
        return {
            "REDIS_URL": redis_url,
            "MODELS_CONFIG": str(catalogue),
            "UPSTREAM_BASE_URL": simulator.base_url,
        }

    @pytest.fixture
    def database_url(self, sqlite_url: str) -> str:
        return sqlite_url

    def test_slot_and_reservation_are_released(self, app, simulator):
        from app.identity.apikeys import issue_key

        app.config["PROPAGATE_EXCEPTIONS"] = False  # as in production: the error handler answers
        failing = {"on": True}

        @app.after_request
        def broken_hook(response):
            if failing["on"] and response.is_streamed:
                raise RuntimeError("an after_request hook failed")
            return response

        with app.app_context():
            tenant = accounts.create_tenant("streams", token_quota=10_000)
            _, key = issue_key(tenant, "k", ["inference:invoke"])
            tenant_id = tenant.id
        client = app.test_client()
        body = {
            "model": "upstream-chat",
            "stream": True,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
        }
        headers = {"Authorization": f"Bearer {key}"}
        simulator.configure(tokens=5)

        dropped = client.post(CHAT, json=body, headers=headers)
        assert dropped.status_code == 500
        assert dropped.get_json()["error"]["code"] == "internal_error"
        with app.app_context():
            assert quota.counted(tenant_id) == 0, "the dropped stream's reservation is still held"

        # The model's one slot is free again. (Not streamed: the test process has no gevent hub, so
        # a stream's pump thread can't read the upstream's gevent socket; gunicorn's workers can.)
        served = client.post(CHAT, json={**body, "stream": False}, headers=headers)
        assert served.status_code == 200, served.get_json()
        with app.app_context():
            used = quota.persisted_usage(tenant_id, quota.period_key("day"))
            assert used > 0 and quota.counted(tenant_id) == used


# --- a worker killed mid-generation -----------------------------------------------------------

LEASE_S = 2.0


@pytest.fixture
def lease_server(postgres_url: str, redis_url: str) -> Iterator[tuple[QuotaServer, Simulator]]:
    with run_simulator(latency_ms=0) as sim:
        env = {
            "DATABASE_URL": postgres_url,
            "REDIS_URL": redis_url,
            "MODELS_CONFIG": str(support.ROOT / "bench" / "models.yaml"),
            "UPSTREAM_BASE_URL": sim.base_url,
            "QUOTA_LEASE_SECONDS": str(LEASE_S),
        }
        with support.GunicornServer(env, workers=2, ready_path="/readyz") as server:
            yield QuotaServer(server, postgres_url, redis_url), sim


@pytest.mark.server
def test_a_worker_killed_mid_generation_gives_its_reservation_back(lease_server, redis_url, monkeypatch):
    """kill -9 of the worker serving a stream: its reservation is reclaimed within the lease time,
    so the tenant's counter comes back to exactly the ledger; the audit chain has no hole."""
    gateway, sim = lease_server
    tenant_id, key = gateway.tenant("killed", 10_000)
    assert gateway.chat(key).status_code == 200
    settled = gateway.settled(tenant_id)
    assert settled > 0

    # Reads the counter the way the gateway does (reclaiming expired leases first).
    monkeypatch.setenv("DATABASE_URL", gateway.database_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    from app import create_app

    reader = create_app()

    def counted() -> int | None:
        with reader.app_context():
            return quota.counted(tenant_id)

    sim.configure(tokens=200, tokens_per_s=5)  # 40 s of generation: in flight throughout
    body = json.dumps(
        {
            "model": "upstream-chat",
            "max_tokens": 200,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        }
    ).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=30) as sock:
        sock.sendall(head + body)
        received = b""
        while b" tok1" not in received:
            data = sock.recv(4096)
            assert data, f"the stream ended before generation was under way: {received!r}"
            received += data
        worker = gateway.server.worker_serving(sock.getsockname()[1])
        # Held while the worker lives, past several lease times: the worker renews its lease.
        time.sleep(2 * LEASE_S)
        held = counted()
        assert held is not None and held > settled, "the live stream's reservation must be held"
        os.kill(worker, signal.SIGKILL)
        killed_at = time.monotonic()
        while counted() != settled:
            assert time.monotonic() - killed_at < LEASE_S + 3, f"counter {counted()}, ledger {settled}"
            time.sleep(0.05)
    assert gateway.recorded(tenant_id) == settled

    # The surviving (and the respawned) workers serve the tenant, and settle exactly.
    sim.configure(tokens=MAX_TOKENS, tokens_per_s=0)
    assert gateway.chat(key).status_code == 200
    after = gateway.settled(tenant_id)
    assert after > settled and counted() == after

    # No hole in any audit chain: both finished chats are in it, and so is the one the kill cut,
    # recovered from the dead worker's journal by a live worker (journal.py) within a few seconds.
    from app.extensions import db
    from app.governance.audit.verify import all_chains, verify

    deadline = time.monotonic() + 20
    with reader.app_context():
        while True:
            with db.engine.connect() as conn:
                report = verify(conn, all_chains(conn))
                records = conn.execute(
                    sql_text("SELECT status, details FROM audit_records WHERE tenant_id = :t ORDER BY seq"),
                    {"t": tenant_id},
                ).all()
            if len(records) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert report["ok"], report
        assert len(records) == 3, f"two finished chats and the cut one: {records}"
        details = [d if isinstance(d, dict) else json.loads(d or "null") for _, d in records]
        cut = [
            (status, d) for (status, _), d in zip(records, details, strict=True) if d and d.get("recovered")
        ]
        assert cut == [(0, {"recovered": "worker_died_mid_request"})], records
        db.engine.dispose()
    reader.extensions["usage_ledger"].close()


def test_a_settlement_rides_with_the_next_reservation_in_one_round_trip(app, monkeypatch):
    """Settling sends nothing by itself; this worker's next reservation carries it, in order, in
    the same script call, so a tight quota freed by a settlement admits the next request."""
    from redis.commands.core import Script

    counters = app.extensions["quota_counters"]
    if not isinstance(counters, quota.RedisCounters):
        pytest.skip("the in-process counters have no round trips")
    monkeypatch.setattr(quota, "SETTLE_DELAY_S", 60.0)  # the flusher must not beat the reservation
    principal = tenant_principal(app, token_quota=100)
    calls: list[int] = []
    run = Script.__call__

    def counting(script, keys=(), args=(), client=None):
        calls.append(len(keys))
        return run(script, keys=keys, args=args, client=client)

    with app.app_context():
        first = quota.reserve(principal, 80)
        monkeypatch.setattr(Script, "__call__", counting)
        first.settle(10)
        assert calls == [], "a settlement is queued, not sent"
        second = quota.reserve(principal, 80)  # 10 + 80 fits only once the settlement has landed
        assert calls == [4], "one call: the settlement's counter and leases, then the reservation's"
        second.release()
        assert quota.counted(principal.tenant_id) == 10
