"""Rate limits: per-tenant and per-credential values, headers, the 429 shape, exactness across two
gunicorn workers, and both Redis-down policies (RATELIMIT_FAIL_OPEN)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.extensions import db
from app.identity import apikeys
from app.identity import scopes as sc
from app.identity.models import Tenant
from tests.support import GunicornServer
from tests.test_identity import assert_error, bearer, seed


@pytest.fixture
def app_env(redis_url: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url}


def set_limits(client, world, **limits) -> None:
    resp = client.patch(
        f"/v1/governance/tenants/{world.a_tenant}", headers=bearer(world.admin_key), json=limits
    )
    assert resp.status_code == 200, resp.get_json()


def test_tenant_limit_counts_down_then_429_in_our_shape(client):
    world = seed(client.application)
    set_limits(client, world, rate_limit="3/minute")
    remaining = []
    for _ in range(3):
        resp = client.get("/v1/auth/me", headers=bearer(world.a_key))
        assert resp.status_code == 200
        assert resp.headers["X-RateLimit-Limit"] == "3"
        remaining.append(int(resp.headers["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]
    refused = client.get("/v1/auth/me", headers=bearer(world.a_inference_key))  # any key of the tenant
    body = assert_error(refused, 429, "rate_limit_exceeded")
    assert body["error"]["type"] == "rate_limit_error" and "3 per 1 minute" in body["error"]["message"]
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    # Another tenant has its own bucket.
    assert client.get("/v1/auth/me", headers=bearer(world.b_key)).status_code == 200


def test_per_credential_limit_within_a_tenant(client):
    world = seed(client.application)
    set_limits(client, world, key_rate_limit="2/minute")
    statuses = [client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert client.get("/v1/auth/me", headers=bearer(world.a_inference_key)).status_code == 200


def test_default_limit_comes_from_config(app, client):
    world = seed(app)
    app.config["RATE_LIMIT_DEFAULT"] = "2/minute"
    statuses = [client.get("/v1/auth/me", headers=bearer(world.b_key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_a_changed_limit_applies_on_the_next_request(client):
    world = seed(client.application)
    set_limits(client, world, rate_limit="1/minute")
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 429
    set_limits(client, world, rate_limit="5/minute")
    resp = client.get("/v1/auth/me", headers=bearer(world.a_key))
    assert resp.status_code == 200 and resp.headers["X-RateLimit-Limit"] == "5"


def test_token_endpoint_is_limited_per_client_address(app, client):
    app.config["AUTH_TOKEN_RATE_LIMIT"] = "2/minute"
    form = {"grant_type": "password", "username": "nobody", "password": "guess"}
    statuses = [client.post("/v1/auth/token", data=form).status_code for _ in range(3)]
    assert statuses == [400, 400, 429]


def test_limits_work_without_redis(monkeypatch, database_url):
    """The single-process default: flask-limiter's memory storage."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.delenv("REDIS_URL", raising=False)
    from app import create_app

    app = create_app()
    world = seed(app)
    app.config["RATE_LIMIT_DEFAULT"] = "2/minute"
    client = app.test_client()
    statuses = [client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


# --- real gunicorn ------------------------------------------------------------------------------


@pytest.mark.server
def test_exactly_the_limit_is_admitted_across_two_instances(app, sqlite_url, redis_url):
    """Two gunicorn instances (separate processes, as two workers or two machines are) share one
    Redis window: of 200 concurrent requests, 100 sent to each, exactly 50 are admitted.

    Each instance is driven explicitly, so the test never depends on which worker the kernel
    hands a connection to; both are seen to serve because each one answered its own half."""
    world = seed(app)
    with app.app_context():
        tenant = db.session.get(Tenant, world.a_tenant)
        tenant.rate_limit = "50/minute"
        db.session.commit()
        _, key = apikeys.issue_key(tenant, "load", [sc.INFERENCE_INVOKE])
    start = threading.Barrier(200)

    def call(i: int) -> requests.Response:
        url = (first if i % 2 else second).url
        with requests.Session() as session:
            start.wait()
            return session.get(
                url + "/v1/auth/me",
                headers={**bearer(key), "Connection": "close", "X-Request-ID": f"burst-{i}"},
                timeout=60,
            )

    env = {"DATABASE_URL": sqlite_url, "REDIS_URL": redis_url}
    with GunicornServer(env, workers=1) as first, GunicornServer(env, workers=1) as second:
        with ThreadPoolExecutor(200) as pool:
            responses = list(pool.map(call, range(200)))
        logs = first.log() + second.log()
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 50 and statuses.count(429) == 150, statuses
    admitted = [int(r.headers["X-RateLimit-Remaining"]) for r in responses if r.status_code == 200]
    assert all(0 <= n < 50 for n in admitted) and min(admitted) == 0
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers["X-RateLimit-Remaining"] == "0" and int(refused.headers["Retry-After"]) > 0
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "Traceback" not in logs and '"level": "error"' not in logs


@pytest.mark.server
@pytest.mark.parametrize(("fail_open", "expected"), [("true", 200), ("false", 503)])
def test_redis_down_policy(app, sqlite_url, fail_open, expected):
    """RATELIMIT_FAIL_OPEN=true serves unlimited while Redis is down; false refuses with 503."""
    world = seed(app)
    env = {"DATABASE_URL": sqlite_url, "REDIS_URL": "redis://127.0.0.1:1/0", "RATELIMIT_FAIL_OPEN": fail_open}
    with GunicornServer(env, workers=1) as server:
        responses = [
            requests.get(
                server.url + "/v1/auth/me", headers={**bearer(world.a_key), "Connection": "close"}, timeout=10
            )
            for _ in range(3)
        ]
        log = server.log()
    for resp in responses:
        assert resp.status_code == expected, resp.text
        assert "X-RateLimit-Limit" not in resp.headers
    if expected == 503:
        body = responses[0].json()
        assert (
            body["error"]["code"] == "rate_limit_unavailable" and responses[0].headers["Retry-After"] == "1"
        )
    else:
        assert responses[0].json()["tenant_name"] == "acme"
        assert log.count("Failed to rate limit. Swallowing error") == 3  # the outage is logged, not hidden


def test_both_buckets_in_one_round_trip_on_flask_limiters_own_keys(app, client, monkeypatch):
    """The tenant and credential buckets are hit by one script call, which also reads the identity
    revision for the cached key, with no second call for the headers, on the keys flask-limiter
    itself reads: its own window stats see the same counts."""
    from limits import parse
    from redis.commands.core import Script

    from app.extensions import limiter

    world = seed(app)
    set_limits(client, world, rate_limit="5/minute", key_rate_limit="4/minute")
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200  # key verified, cached
    calls: list[int] = []
    run = Script.__call__

    def counting(script, keys=(), args=(), client=None):
        calls.append(len(keys))
        return run(script, keys=keys, args=args, client=client)

    monkeypatch.setattr(Script, "__call__", counting)
    for _ in range(2):
        resp = client.get("/v1/auth/me", headers=bearer(world.a_key))
        assert resp.status_code == 200
        assert resp.headers["X-RateLimit-Limit"] == "4"  # flask-limiter's header choice: the first by order
    assert calls == [3, 3], "one script call per request: both buckets and the identity revision"
    with app.app_context():
        me = client.get("/v1/auth/me", headers=bearer(world.a_key)).get_json()
        tenant = limiter.limiter.get_window_stats(parse("5/minute"), world.a_tenant, "tenant")
        credential = limiter.limiter.get_window_stats(parse("4/minute"), me["subject"], "credential")
    assert (tenant.remaining, credential.remaining) == (1, 0)
