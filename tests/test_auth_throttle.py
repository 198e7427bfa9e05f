"""Failed API-key authentications are throttled before any hash (app/identity/auth_throttle.py):
per client address, and per key prefix without locking out the prefix's owner. On real Redis."""

from __future__ import annotations

import pytest

from app.identity import apikeys
from tests.test_identity import assert_error, bearer, seed

ATTACKER = "203.0.113.7"
OWNER = "198.51.100.20"
OTHER = "192.0.2.55"
FORGED_SECRET = "A" * 43


@pytest.fixture
def app_env(redis_url: str) -> dict[str, str]:
    # No verified-key cache: every valid request below must pass the throttle and a hash itself.
    return {
        "REDIS_URL": redis_url,
        "AUTH_KEY_CACHE_TTL": "0",
        "AUTH_FAILURE_LIMIT_PER_ADDRESS": "5/minute",
        "AUTH_FAILURE_LIMIT_PER_PREFIX": "8/minute",
    }


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every secret hash check the key path makes (HMAC, or argon2 for a legacy key), in this process."""
    calls: list[str] = []
    verify = apikeys.check_secret

    def counting(stored_hash: str, secret: str) -> bool:
        calls.append(secret)
        return verify(stored_hash, secret)

    monkeypatch.setattr(apikeys, "check_secret", counting)
    return calls


def call(client, key: str, address: str):
    return client.get("/v1/auth/me", headers=bearer(key), environ_base={"REMOTE_ADDR": address})


def test_bad_secrets_from_one_address_get_429_without_a_hash(client, hashes):
    world = seed(client.application)
    forged = f"{world.a_prefix}_{FORGED_SECRET}"
    for _ in range(5):
        assert_error(call(client, forged, ATTACKER), 401, "invalid_api_key")
    assert len(hashes) == 5
    for _ in range(20):
        refused = call(client, forged, ATTACKER)
        body = assert_error(refused, 429, "auth_failures_throttled")
        assert body["error"]["type"] == "rate_limit_error"
        assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert len(hashes) == 5, "a throttled attempt must cost no hash"
    # Even a valid key is not verified from the flooding address (it would cost a hash too)...
    assert_error(call(client, world.a_key, ATTACKER), 429, "auth_failures_throttled")
    assert len(hashes) == 5
    # ...but from any other address the key works, as do other keys.
    assert call(client, world.a_key, OWNER).status_code == 200
    assert call(client, world.b_key, OTHER).status_code == 200
    assert len(hashes) == 7


def test_a_prefix_under_attack_stays_open_to_its_owner(client, hashes):
    """A flood spread over many addresses: once the prefix is over its limit, each address that
    failed on it is cut off for it, while the owner's address, with no failure, is still served."""
    world = seed(client.application)
    forged = f"{world.a_prefix}_{FORGED_SECRET}"
    attackers = [f"10.0.0.{n}" for n in range(1, 5)]
    for address in attackers:  # 4 addresses x 2 failures: the prefix reaches its 8/minute
        for _ in range(2):
            assert_error(call(client, forged, address), 401, "invalid_api_key")
    assert len(hashes) == 8
    for address in attackers:  # each under its own 5/minute, yet refused unhashed for this prefix
        assert_error(call(client, forged, address), 429, "auth_failures_throttled")
    assert len(hashes) == 8
    # A new address gets one try at the prefix under attack, then no more.
    assert_error(call(client, forged, OTHER), 401, "invalid_api_key")
    assert_error(call(client, forged, OTHER), 429, "auth_failures_throttled")
    assert len(hashes) == 9
    # The owner, from an address without failures, is served every time; successes count nowhere.
    for _ in range(10):
        assert call(client, world.a_key, OWNER).status_code == 200
    assert len(hashes) == 19
    # Other prefixes are untouched, from the attacking addresses too.
    assert call(client, world.b_key, attackers[0]).status_code == 200


def test_client_credentials_grant_is_throttled_too(client, hashes):
    world = seed(client.application)
    form = {
        "grant_type": "client_credentials",
        "client_id": world.a_prefix,
        "client_secret": f"{world.a_prefix}_{FORGED_SECRET}",
    }
    statuses = [
        client.post("/v1/auth/token", data=form, environ_base={"REMOTE_ADDR": ATTACKER}).status_code
        for _ in range(7)
    ]
    assert statuses == [401] * 5 + [429] * 2
    assert len(hashes) == 5


def test_a_known_block_is_refused_in_front_of_the_app(client, hashes):
    """Once this worker knows a bucket is blocked, the refusal is made before Flask dispatches
    (no hook, no view, no hash), with the same answer as the app's own, and it is counted."""
    from app.identity.auth_throttle import REFUSED_EARLY

    app = client.application
    world = seed(app)
    forged = f"{world.a_prefix}_{FORGED_SECRET}"
    for _ in range(5):
        assert_error(call(client, forged, ATTACKER), 401, "invalid_api_key")
    in_app = call(client, forged, ATTACKER)  # the app learns the block here
    in_app_body = assert_error(in_app, 429, "auth_failures_throttled")
    dispatched: list[str] = []
    app.before_request_funcs.setdefault(None, []).insert(0, lambda: dispatched.append("request"))
    before = REFUSED_EARLY._value.get()
    early = client.get(
        "/v1/auth/me",
        headers={**bearer(forged), "X-Request-ID": "flood-probe-1"},
        environ_base={"REMOTE_ADDR": ATTACKER},
    )
    body = assert_error(early, 429, "auth_failures_throttled")
    assert dispatched == [], "the refusal must not enter Flask's dispatch"
    assert REFUSED_EARLY._value.get() == before + 1
    assert body["error"] == in_app_body["error"] | {"message": body["error"]["message"]}
    assert body["error"]["message"].startswith("Too many failed authentications")
    assert body["request_id"] == early.headers["X-Request-ID"] == "flood-probe-1"
    assert 0 < int(early.headers["Retry-After"]) <= 60
    # A valid key from the blocked address is refused early too (it would cost a hash)...
    assert_error(call(client, world.a_key, ATTACKER), 429, "auth_failures_throttled")
    assert dispatched == [] and len(hashes) == 5
    # ...while the key from another address goes to the app, and is served.
    assert call(client, world.a_key, OWNER).status_code == 200
    assert dispatched == ["request"]


def test_the_early_refusal_is_outside_the_admission_gate(client, monkeypatch):
    """A known block is refused before the worker's admission gate (its slots, its gauges): a
    flood never takes a valid request's place, and a full gate still answers the flood 429."""
    from app.identity.auth_throttle import EarlyRefusal

    app = client.application
    assert isinstance(app.wsgi_app, EarlyRefusal)
    world = seed(app)
    forged = f"{world.a_prefix}_{FORGED_SECRET}"
    for _ in range(6):
        call(client, forged, ATTACKER)  # five 401s, then the app learns the block
    gate = app.extensions["admission_gate"]
    entered: list[str] = []
    monkeypatch.setattr(gate, "enter", lambda: entered.append("enter") or "queue_full")
    refused = call(client, forged, ATTACKER)
    body = assert_error(refused, 429, "auth_failures_throttled")
    assert entered == []
    assert len(body["request_id"]) == 32 and refused.headers["X-Request-ID"] == body["request_id"]
    # Everything else still goes through the gate (here: full, so 503).
    assert call(client, world.a_key, OWNER).status_code == 503
    assert entered == ["enter"]
