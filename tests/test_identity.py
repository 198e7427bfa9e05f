"""Identity and access: credentials, tokens, scopes, tenant isolation, stored secrets, CLI, docs."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import jwt as pyjwt
import pytest
from openapi_spec_validator import validate
from sqlalchemy import text, update

from app.extensions import db
from app.identity import accounts, apikeys
from app.identity import scopes as sc
from app.identity.cache import cache
from app.identity.models import ApiKey, Tenant, utcnow

PASSWORD = "correct horse battery staple"
GOV_RW = [sc.GOVERNANCE_READ, sc.GOVERNANCE_WRITE, sc.INFERENCE_INVOKE, sc.MODELS_READ]


@dataclass
class World:
    """Three tenants: the platform (admin key), acme and globex, each with a governance key."""

    platform_id: str
    admin_key: str
    a_tenant: str
    a_key: str
    a_key_id: str
    a_prefix: str
    a_user: str
    a_inference_key: str
    b_tenant: str
    b_key: str


def seed(app) -> World:
    with app.app_context():
        platform = accounts.create_tenant("platform")
        acme = accounts.create_tenant("acme")
        globex = accounts.create_tenant("globex")
        _, admin_key = apikeys.issue_key(platform, "admin", [sc.ADMIN])
        user = accounts.create_user(acme, "alice", PASSWORD, [sc.GOVERNANCE_READ, sc.INFERENCE_INVOKE])
        a_key, a_full = apikeys.issue_key(acme, "acme-gov", GOV_RW, user=user)
        _, a_inference = apikeys.issue_key(acme, "acme-inference", [sc.INFERENCE_INVOKE])
        accounts.create_user(globex, "gina", PASSWORD, [sc.INFERENCE_INVOKE])
        _, b_full = apikeys.issue_key(globex, "globex-gov", GOV_RW)
        return World(
            platform_id=platform.id,
            admin_key=admin_key,
            a_tenant=acme.id,
            a_key=a_full,
            a_key_id=a_key.id,
            a_prefix=a_key.prefix,
            a_user=user.id,
            a_inference_key=a_inference,
            b_tenant=globex.id,
            b_key=b_full,
        )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(resp, status: int, code: str) -> dict:
    """Our one error shape, the expected status and code, and never a traceback."""
    raw = resp.get_data(as_text=True)
    assert resp.status_code == status, raw
    body = resp.get_json()
    assert set(body) == {"error", "request_id"}
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body
    assert "Traceback" not in raw
    return body


def password_tokens(client, username: str = "alice", **extra: str) -> dict:
    resp = client.post(
        "/v1/auth/token", data={"grant_type": "password", "username": username, "password": PASSWORD, **extra}
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


@pytest.fixture
def world(app) -> World:
    return seed(app)


# --- authentication failures: 401 in our shape, never 422 -------------------------------------


def _unsigned(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def _claims(world: World, **extra) -> dict:
    now = int(time.time())
    return {
        "sub": f"user:{world.a_user}",
        "tenant": world.a_tenant,
        "scopes": [sc.ADMIN],
        "kind": "user",
        "user_id": world.a_user,
        "type": "access",
        "jti": "forged",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        **extra,
    }


BAD_CREDENTIALS = {
    "no header": (None, "missing_token"),
    "basic scheme": ("Basic YWxpY2U6c2VjcmV0", "invalid_request"),
    "bearer without token": ("Bearer", "invalid_request"),
    "bearer with two tokens": ("Bearer abc def", "invalid_request"),
    "neither key nor jwt": ("Bearer hello", "invalid_token"),
    "garbage jwt": ("Bearer a.b.c", "invalid_token"),
    "unknown api key": (f"Bearer gw-000000000000_{'A' * 43}", "invalid_api_key"),
    "malformed api key": ("Bearer gw-short", "invalid_api_key"),
    "alg none": ("alg-none", "invalid_token"),
    "wrong signature": ("wrong-signature", "invalid_token"),
    "expired": ("expired", "token_expired"),
    "refresh as access": ("refresh", "invalid_token"),
    "revoked access token": ("revoked", "token_revoked"),
    "revoked api key": ("revoked-key", "invalid_api_key"),
}


@pytest.mark.parametrize("case", BAD_CREDENTIALS, ids=list(BAD_CREDENTIALS))
def test_bad_credentials_get_401_in_our_shape(app, client, world, case):
    header, code = BAD_CREDENTIALS[case]
    secret = app.config["JWT_SECRET_KEY"]
    if header == "alg-none":
        header = f"Bearer {_unsigned(_claims(world))}"
    elif header == "wrong-signature":
        header = f"Bearer {pyjwt.encode(_claims(world), 'not-the-key-but-long-enough-for-hs256!', 'HS256')}"
    elif header == "expired":
        expired = _claims(
            world, iat=int(time.time()) - 120, nbf=int(time.time()) - 120, exp=int(time.time()) - 60
        )
        header = f"Bearer {pyjwt.encode(expired, secret, 'HS256')}"
    elif header == "refresh":
        header = f"Bearer {password_tokens(client)['refresh_token']}"
    elif header == "revoked":
        access = password_tokens(client)["access_token"]
        assert client.post("/v1/auth/revoke", headers=bearer(access)).status_code == 200
        header = f"Bearer {access}"
    elif header == "revoked-key":
        admin = bearer(world.admin_key)
        assert client.post(f"/v1/governance/keys/{world.a_key_id}/revoke", headers=admin).status_code == 200
        header = f"Bearer {world.a_key}"
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/v1/auth/me"), ("POST", "/v1/governance/users")):
        # A body that would fail validation: authentication must answer first, so never 422.
        resp = client.open(path, method=method, headers=headers, json={"username": 1})
        assert_error(resp, 401, code)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_missing_scope_is_403_insufficient_scope_before_validation(client, world):
    resp = client.post("/v1/governance/users", headers=bearer(world.a_inference_key), json={"bad": True})
    body = assert_error(resp, 403, "insufficient_scope")
    assert body["error"]["type"] == "permission_error"
    assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert 'scope="governance:write"' in resp.headers["WWW-Authenticate"]


def test_disabled_tenant_is_refused_at_once(client, world):
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
    resp = client.patch(
        f"/v1/governance/tenants/{world.a_tenant}", headers=bearer(world.admin_key), json={"active": False}
    )
    assert resp.status_code == 200 and resp.get_json()["active"] is False
    assert_error(client.get("/v1/auth/me", headers=bearer(world.a_key)), 403, "tenant_disabled")


# --- the token endpoint (RFC 6749) --------------------------------------------------------------


def test_password_grant_issues_access_and_refresh(app, client, world):
    resp = client.post(
        "/v1/auth/token", data={"grant_type": "password", "username": "alice", "password": PASSWORD}
    )
    assert resp.status_code == 200
    assert resp.headers["Cache-Control"] == "no-store" and resp.headers["Pragma"] == "no-cache"
    body = resp.get_json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == app.config["JWT_ACCESS_TOKEN_EXPIRES_S"]
    assert body["scope"] == "governance:read inference:invoke"
    claims = pyjwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == f"user:{world.a_user}" and isinstance(claims["sub"], str)
    assert claims["tenant"] == world.a_tenant and claims["type"] == "access"
    assert claims["exp"] - claims["iat"] == app.config["JWT_ACCESS_TOKEN_EXPIRES_S"]
    me = client.get("/v1/auth/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.get_json() | {"scopes": None} == {
        "tenant_id": world.a_tenant,
        "tenant_name": "acme",
        "subject": f"user:{world.a_user}",
        "kind": "user",
        "scopes": None,
        "key_id": None,
        "user_id": world.a_user,
        "is_admin": False,
    }


def test_client_credentials_form_and_basic(client, world):
    form = {"grant_type": "client_credentials", "client_id": world.a_prefix, "client_secret": world.a_key}
    body = client.post("/v1/auth/token", data=form).get_json()
    assert "refresh_token" not in body and body["token_type"] == "Bearer"
    assert set(body["scope"].split()) == set(GOV_RW)
    basic = base64.b64encode(f"{world.a_prefix}:{world.a_key}".encode()).decode()
    narrowed = client.post(
        "/v1/auth/token",
        data={"grant_type": "client_credentials", "scope": sc.MODELS_READ},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert narrowed.status_code == 200 and narrowed.get_json()["scope"] == sc.MODELS_READ
    me = client.get("/v1/auth/me", headers=bearer(narrowed.get_json()["access_token"])).get_json()
    assert me["kind"] == "api_key" and me["key_id"] == world.a_key_id and me["scopes"] == [sc.MODELS_READ]
    # The narrowed token really is narrowed.
    resp = client.get("/v1/governance/users", headers=bearer(narrowed.get_json()["access_token"]))
    assert_error(resp, 403, "insufficient_scope")


TOKEN_ERRORS = {
    "no grant_type": ({}, 400, "invalid_request"),
    "unknown grant_type": ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
    "password missing": ({"grant_type": "password", "username": "alice"}, 400, "invalid_request"),
    "wrong password": (
        {"grant_type": "password", "username": "alice", "password": "x"},
        400,
        "invalid_grant",
    ),
    "unknown user": (
        {"grant_type": "password", "username": "bob", "password": PASSWORD},
        400,
        "invalid_grant",
    ),
    "scope not held": (
        {"grant_type": "password", "username": "alice", "password": PASSWORD, "scope": "admin"},
        400,
        "invalid_scope",
    ),
    "unknown scope": (
        {"grant_type": "password", "username": "alice", "password": PASSWORD, "scope": "root"},
        400,
        "invalid_scope",
    ),
    "no client auth": ({"grant_type": "client_credentials"}, 401, "invalid_client"),
    "wrong client secret": (
        {"grant_type": "client_credentials", "client_id": "<prefix>", "client_secret": "gw-nope"},
        401,
        "invalid_client",
    ),
    "secret of another client": (
        {"grant_type": "client_credentials", "client_id": "gw-000000000000", "client_secret": "<key>"},
        401,
        "invalid_client",
    ),
}


@pytest.mark.parametrize("case", TOKEN_ERRORS, ids=list(TOKEN_ERRORS))
def test_token_endpoint_rfc6749_errors(client, world, case):
    form, status, code = TOKEN_ERRORS[case]
    form = {k: v.replace("<prefix>", world.a_prefix).replace("<key>", world.a_key) for k, v in form.items()}
    resp = client.post("/v1/auth/token", data=form)
    assert_error(resp, status, code)


def test_token_endpoint_wants_a_form_not_json(client, world):
    resp = client.post(
        "/v1/auth/token", json={"grant_type": "password", "username": "alice", "password": PASSWORD}
    )
    assert_error(resp, 400, "invalid_request")


def test_token_endpoint_refuses_two_client_authentications(client, world):
    basic = base64.b64encode(f"{world.a_prefix}:{world.a_key}".encode()).decode()
    resp = client.post(
        "/v1/auth/token",
        data={"grant_type": "client_credentials", "client_id": world.a_prefix, "client_secret": world.a_key},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert_error(resp, 400, "invalid_request")


def test_refresh_rotates_and_the_old_refresh_token_dies(client, world):
    tokens = password_tokens(client)
    resp = client.post("/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    fresh = resp.get_json()
    assert fresh["refresh_token"] != tokens["refresh_token"]
    assert client.get("/v1/auth/me", headers=bearer(fresh["access_token"])).status_code == 200
    assert_error(
        client.post("/v1/auth/refresh", headers=bearer(tokens["refresh_token"])), 401, "token_revoked"
    )
    assert_error(client.post("/v1/auth/refresh", headers=bearer(fresh["access_token"])), 401, "invalid_token")


def test_revoking_an_access_token_also_revokes_its_refresh_token(client, world):
    tokens = password_tokens(client)
    resp = client.post("/v1/auth/revoke", headers=bearer(tokens["access_token"]))
    assert resp.get_json() == {"revoked": ["access", "refresh"]}
    assert_error(client.get("/v1/auth/me", headers=bearer(tokens["access_token"])), 401, "token_revoked")
    assert_error(
        client.post("/v1/auth/refresh", headers=bearer(tokens["refresh_token"])), 401, "token_revoked"
    )


class TestWithAndWithoutRedis:
    """The blocklist in Redis (every worker) and in the process (no REDIS_URL) behave the same."""

    @pytest.fixture(params=["local", "redis"])
    def app_env(self, request: pytest.FixtureRequest) -> dict[str, str]:
        return {} if request.param == "local" else {"REDIS_URL": request.getfixturevalue("redis_url")}

    def test_revoking_a_refresh_token_also_revokes_its_access_token(self, client, world):
        tokens = password_tokens(client)
        other = password_tokens(client)
        assert client.get("/v1/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
        resp = client.post("/v1/auth/revoke", headers=bearer(tokens["refresh_token"]))
        assert resp.status_code == 200 and resp.get_json() == {"revoked": ["refresh", "access"]}
        assert_error(client.get("/v1/auth/me", headers=bearer(tokens["access_token"])), 401, "token_revoked")
        assert_error(
            client.post("/v1/auth/refresh", headers=bearer(tokens["refresh_token"])), 401, "token_revoked"
        )
        # Another login's pair is untouched.
        assert client.get("/v1/auth/me", headers=bearer(other["access_token"])).status_code == 200

    def test_rotation_revokes_the_old_access_token(self, client, world):
        """Refreshing replaces the pair: the old access token is refused at once, in our shape,
        the new one works, and another login's pair is untouched."""
        tokens = password_tokens(client)
        other = password_tokens(client)
        assert client.get("/v1/auth/me", headers=bearer(tokens["access_token"])).status_code == 200
        resp = client.post("/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
        assert resp.status_code == 200
        fresh = resp.get_json()
        assert_error(client.get("/v1/auth/me", headers=bearer(tokens["access_token"])), 401, "token_revoked")
        assert client.get("/v1/auth/me", headers=bearer(fresh["access_token"])).status_code == 200
        assert client.get("/v1/auth/me", headers=bearer(other["access_token"])).status_code == 200
        assert_error(
            client.post("/v1/auth/refresh", headers=bearer(tokens["refresh_token"])), 401, "token_revoked"
        )
        assert client.post("/v1/auth/refresh", headers=bearer(fresh["refresh_token"])).status_code == 200

    def test_concurrent_refreshes_of_one_token_yield_exactly_one_pair(self, app, world):
        refresh_token = password_tokens(app.test_client())["refresh_token"]
        racers = 8
        start = threading.Barrier(racers)

        def refresh(_: int):
            client = app.test_client()
            start.wait()
            return client.post("/v1/auth/refresh", headers=bearer(refresh_token))

        with ThreadPoolExecutor(racers) as pool:
            responses = list(pool.map(refresh, range(racers)))
        winners = [r for r in responses if r.status_code == 200]
        assert len(winners) == 1, [r.get_json() for r in responses]
        for resp in responses:
            if resp.status_code != 200:
                assert_error(resp, 401, "token_revoked")
        fresh = winners[0].get_json()
        assert app.test_client().get("/v1/auth/me", headers=bearer(fresh["access_token"])).status_code == 200


def test_revoking_a_key_ends_its_jwts_too(client, world):
    form = {"grant_type": "client_credentials", "client_id": world.a_prefix, "client_secret": world.a_key}
    access = client.post("/v1/auth/token", data=form).get_json()["access_token"]
    assert client.get("/v1/auth/me", headers=bearer(access)).status_code == 200
    resp = client.post(f"/v1/governance/keys/{world.a_key_id}/revoke", headers=bearer(world.admin_key))
    assert resp.status_code == 200 and resp.get_json()["revoked_at"]
    assert_error(client.get("/v1/auth/me", headers=bearer(access)), 401, "token_revoked")
    assert_error(client.get("/v1/auth/me", headers=bearer(world.a_key)), 401, "invalid_api_key")
    assert_error(client.post("/v1/auth/token", data=form), 401, "invalid_client")


def test_expired_key_is_refused_even_when_cached(app, client, world):
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200  # now cached
    with app.app_context():
        db.session.execute(
            update(ApiKey)
            .where(ApiKey.id == world.a_key_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
        cache().invalidate()
    assert_error(client.get("/v1/auth/me", headers=bearer(world.a_key)), 401, "invalid_api_key")


def test_key_use_records_last_used_at(app, client, world):
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
    listed = client.get(f"/v1/governance/keys/{world.a_key_id}", headers=bearer(world.a_key)).get_json()
    assert listed["last_used_at"] is not None
    assert "key" not in listed and "secret_hash" not in listed


# --- key cache and its invalidation across processes --------------------------------------------


def test_revocation_reaches_another_worker_through_the_redis_revision(app, world, redis_url, monkeypatch):
    """Two app instances on one database and Redis stand for two workers."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    from app import create_app

    worker_a, worker_b = create_app(), create_app()
    a, b = worker_a.test_client(), worker_b.test_client()
    for _ in range(3):  # worker B has the key cached
        assert b.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
    assert (
        a.post(f"/v1/governance/keys/{world.a_key_id}/revoke", headers=bearer(world.admin_key)).status_code
        == 200
    )
    assert_error(b.get("/v1/auth/me", headers=bearer(world.a_key)), 401, "invalid_api_key")
    for instance in (worker_a, worker_b):
        with instance.app_context():
            db.engine.dispose()


def test_a_request_served_from_the_cache_is_rechecked_even_if_another_applied_the_revision(
    app, world, redis_url, monkeypatch
):
    """A cached key is served before the revision is read (it rides in the rate-limit script). If
    another greenlet of the worker applies the new revision in between, this request must still
    see that its own entry was older, authenticate again and be refused."""
    from app.identity import limits

    monkeypatch.setenv("REDIS_URL", redis_url)
    from app import create_app

    worker_a, worker_b = create_app(), create_app()
    a, b = worker_a.test_client(), worker_b.test_client()
    for _ in range(2):  # worker B has the key cached
        assert b.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
    assert (
        a.post(f"/v1/governance/keys/{world.a_key_id}/revoke", headers=bearer(world.admin_key)).status_code
        == 200
    )
    hit = limits._hit_principal_limits

    def another_greenlet_syncs_first(with_revision: bool = False) -> None:
        worker_b.extensions["identity_cache"].read_revision()
        hit(with_revision)

    monkeypatch.setattr(limits, "_hit_principal_limits", another_greenlet_syncs_first)
    assert_error(b.get("/v1/auth/me", headers=bearer(world.a_key)), 401, "invalid_api_key")
    for instance in (worker_a, worker_b):
        with instance.app_context():
            db.engine.dispose()


def test_key_cache_can_be_switched_off(app, client, world):
    app.extensions["identity_cache"].ttl = 0
    for _ in range(2):
        assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
    assert not app.extensions["identity_cache"]._entries


# --- stored secrets -----------------------------------------------------------------------------


def _stored_hash(app, key_id: str) -> str:
    with app.app_context():
        return db.session.get(ApiKey, key_id).secret_hash


def test_an_argon2_key_from_before_hmac_still_authenticates_and_is_upgraded(app, client, monkeypatch):
    """Keys issued when secrets were argon2-hashed keep working; their first successful use
    replaces the hash with the HMAC one, and a wrong secret never does."""
    from app.identity import hashing

    with app.app_context():
        tenant = accounts.create_tenant("legacy")
        row, full = apikeys.issue_key(tenant, "old", [sc.MODELS_READ])
        prefix, secret = apikeys.split_key(full)
        db.session.execute(
            update(ApiKey).where(ApiKey.id == row.id).values(secret_hash=hashing.hash_secret(secret))
        )
        db.session.commit()
        key_id = row.id
    assert _stored_hash(app, key_id).startswith("$argon2id$")
    assert_error(client.get("/v1/auth/me", headers=bearer(f"{prefix}_{'B' * 43}")), 401, "invalid_api_key")
    assert _stored_hash(app, key_id).startswith("$argon2id$"), "a failed attempt must not rewrite the hash"

    argon2_checks: list[str] = []
    verify = apikeys.verify_secret
    monkeypatch.setattr(apikeys, "verify_secret", lambda h, s: argon2_checks.append(s) or verify(h, s))
    me = client.get("/v1/auth/me", headers=bearer(full))
    assert me.status_code == 200, me.get_json()
    assert argon2_checks == [secret]
    upgraded = _stored_hash(app, key_id)
    assert upgraded.startswith("hmac-sha256$") and secret not in upgraded
    with app.app_context():
        assert app.extensions["api_key_hasher"].verify(upgraded, secret)
        cache().invalidate()  # the next request verifies against the database again
    assert client.get("/v1/auth/me", headers=bearer(full)).status_code == 200
    assert argon2_checks == [secret], "an upgraded key is checked by HMAC only"


@pytest.fixture
def rotated_app(database_url: str, monkeypatch: pytest.MonkeyPatch):
    """A second app on the same database whose pepper was rotated: the first app's is retired."""
    from app import create_app
    from app.governance import audit

    monkeypatch.setenv("DATABASE_URL", database_url)
    built = []

    def build(**env: str):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        built.append(create_app())
        return built[-1]

    yield build
    for application in built:  # as the `app` fixture tears down
        audit.shutdown(application)
        application.extensions["usage_ledger"].close()
        with application.app_context():
            db.session.remove()
            db.engine.dispose()


def test_a_rotated_pepper_still_verifies_old_keys_and_rehashes_them(rotated_app):
    old_pepper, new_pepper = "o" * 40, "n" * 40
    before = rotated_app(API_KEY_PEPPER=old_pepper)
    with before.app_context():
        row, full = apikeys.issue_key(accounts.create_tenant("rotating"), "k", [sc.MODELS_READ])
        key_id = row.id
    old_hash = _stored_hash(before, key_id)
    after = rotated_app(API_KEY_PEPPER=new_pepper, API_KEY_PEPPERS_PREVIOUS=old_pepper)
    assert after.test_client().get("/v1/auth/me", headers=bearer(full)).status_code == 200
    new_hash = _stored_hash(after, key_id)
    assert new_hash != old_hash and after.extensions["api_key_hasher"].is_current(new_hash)
    # Once the old pepper is dropped, a key still hashed under it no longer verifies.
    dropped = rotated_app(API_KEY_PEPPER="x" * 40, API_KEY_PEPPERS_PREVIOUS="")
    resp = dropped.test_client().get("/v1/auth/me", headers=bearer(full))
    assert_error(resp, 401, "invalid_api_key")


class TestOnBothEngines:
    @pytest.fixture
    def database_url(self, any_database_url: str) -> str:
        return any_database_url

    def test_only_hashes_are_stored(self, app, client, world):
        created = client.post(
            "/v1/governance/keys",
            headers=bearer(world.a_key),
            json={"name": "fresh", "scopes": [sc.MODELS_READ]},
        ).get_json()
        secrets = [world.admin_key, world.a_key, world.b_key, world.a_inference_key, created["key"], PASSWORD]
        with app.app_context():
            rows = {
                table: [dict(r._mapping) for r in db.session.execute(text(f"SELECT * FROM {table}"))]
                for table in ("tenants", "users", "api_keys", "token_usage")
            }
        dump = json.dumps(rows, default=str)
        secret_halves = [apikeys.split_key(key)[1] for key in secrets[:-1]]
        for secret in secrets + secret_halves:
            assert secret not in dump
        assert all(r["secret_hash"].startswith("hmac-sha256$") for r in rows["api_keys"])
        assert all(r["password_hash"].startswith("$argon2id$") for r in rows["users"])
        assert created["prefix"] == created["key"][:15] and created["prefix"] in dump

    def test_pagination_walks_every_row_once(self, client, world):
        for i in range(4):
            resp = client.post("/v1/governance/keys", headers=bearer(world.a_key), json={"name": f"k{i}"})
            assert resp.status_code == 201
        seen, cursor = [], None
        while True:
            query = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get(
                "/v1/governance/keys", headers=bearer(world.a_key), query_string=query
            ).get_json()
            seen += [k["id"] for k in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) == 6  # acme-gov, acme-inference and the four new ones
        bad = client.get("/v1/governance/keys", headers=bearer(world.a_key), query_string={"cursor": "!!"})
        assert_error(bad, 422, "validation_error")  # not base64url, as the document says
        forged_cursor = {"cursor": "AAAA"}  # base64url, but not a position this API returned
        forged = client.get("/v1/governance/keys", headers=bearer(world.a_key), query_string=forged_cursor)
        assert_error(forged, 400, "invalid_cursor")


# --- tenant isolation ---------------------------------------------------------------------------

# Every governance route, against tenant acme's resources, called with globex's governance key.
# A route added to the governance blueprint must be added here (or to NOT_TENANT_SCOPED):
# test_every_governance_route_is_in_the_matrix fails until it is. Expected: a status, or "list"
# for 200 with none of acme's rows. `<name>` placeholders are filled with acme's ids.
CROSS_TENANT_MATRIX = [
    ("GET", "/v1/governance/tenants/<tenant_id>", None, 404),
    ("PATCH", "/v1/governance/tenants/<tenant_id>", {"rate_limit": "1/minute"}, 403),
    ("GET", "/v1/governance/tenants", None, "list"),
    ("POST", "/v1/governance/tenants", {"name": "hostile"}, 403),
    ("GET", "/v1/governance/users/<user_id>", None, 404),
    ("GET", "/v1/governance/users?tenant_id=<tenant_id>", None, 403),
    (
        "POST",
        "/v1/governance/users",
        {"tenant_id": "<tenant_id>", "username": "mallory", "password": PASSWORD},
        403,
    ),
    ("GET", "/v1/governance/keys/<key_id>", None, 404),
    ("POST", "/v1/governance/keys/<key_id>/revoke", None, 404),
    ("GET", "/v1/governance/keys?tenant_id=<tenant_id>", None, 403),
    ("POST", "/v1/governance/keys", {"tenant_id": "<tenant_id>", "name": "planted"}, 403),
    ("GET", "/v1/governance/policies?tenant_id=<tenant_id>", None, 403),
    ("PUT", "/v1/governance/policies", {"tenant_id": "<tenant_id>", "rules": {"max_tokens": 1}}, 403),
    ("GET", "/v1/governance/policies/versions?tenant_id=<tenant_id>", None, 403),
    # The audit trail and usage: naming another tenant is refused, never silently narrowed.
    ("GET", "/v1/governance/audit?tenant_id=<tenant_id>", None, 403),
    ("GET", "/v1/governance/audit/export?tenant_id=<tenant_id>", None, 403),
    ("GET", "/v1/governance/audit/verify?tenant_id=<tenant_id>", None, 403),
    ("GET", "/v1/governance/usage?tenant_id=<tenant_id>", None, 403),
]
NOT_TENANT_SCOPED = {
    # The model registry is platform-wide: reads need governance:read, changes need admin.
    ("GET", "/v1/governance/models"),
    ("POST", "/v1/governance/models"),
    ("GET", "/v1/governance/models/<name>"),
    ("POST", "/v1/governance/models/<name>/versions"),
    ("PUT", "/v1/governance/models/<name>/traffic"),
    ("POST", "/v1/governance/models/<name>/promote"),
    ("POST", "/v1/governance/models/<name>/rollback"),
    ("POST", "/v1/governance/models/<name>/disable"),
    ("POST", "/v1/governance/models/<name>/enable"),
    ("POST", "/v1/auth/token"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/revoke"),
    ("GET", "/v1/auth/me"),
    ("GET", "/v1/governance/models/<name>/drift"),  # models are platform-wide; aggregate statistics only
}


def _fill(value, ids: dict[str, str]):
    if isinstance(value, str):
        for name, object_id in ids.items():
            value = value.replace(f"<{name}>", object_id)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    CROSS_TENANT_MATRIX,
    ids=[f"{m} {p}" for m, p, *_ in CROSS_TENANT_MATRIX],
)
def test_another_tenants_key_cannot_reach_this_tenants_resources(client, world, method, path, body, expected):
    ids = {"tenant_id": world.a_tenant, "user_id": world.a_user, "key_id": world.a_key_id}
    resp = client.open(_fill(path, ids), method=method, headers=bearer(world.b_key), json=_fill(body, ids))
    if expected == "list":
        assert resp.status_code == 200
        text_body = resp.get_data(as_text=True)
        assert resp.get_json()["data"], "the list should hold globex's own rows"
        for object_id in ids.values():
            assert object_id not in text_body
    else:
        code = resp.get_json()["error"]["code"]
        assert code in {"not_found", "insufficient_scope", "cross_tenant"}
        assert_error(resp, expected, code)
    # Nothing of acme's changed: its key still works and its tenant is untouched.
    me = client.get("/v1/auth/me", headers=bearer(world.a_key))
    assert me.status_code == 200 and me.get_json()["tenant_name"] == "acme"


def test_every_governance_route_is_in_the_matrix(app):
    classified = {(m, p.split("?")[0]) for m, p, *_ in CROSS_TENANT_MATRIX} | NOT_TENANT_SCOPED
    routes = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("governance.")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routes - classified == set(), "classify these routes in CROSS_TENANT_MATRIX or NOT_TENANT_SCOPED"


def test_admin_crosses_tenants(client, world):
    admin = bearer(world.admin_key)
    assert client.get(f"/v1/governance/users/{world.a_user}", headers=admin).status_code == 200
    tenants = client.get("/v1/governance/tenants", headers=admin).get_json()["data"]
    assert {t["name"] for t in tenants} == {"platform", "acme", "globex"}
    only_acme = client.get("/v1/governance/keys", headers=admin, query_string={"tenant_id": world.a_tenant})
    assert {k["tenant_id"] for k in only_acme.get_json()["data"]} == {world.a_tenant}
    created = client.post(
        "/v1/governance/users",
        headers=admin,
        json={"tenant_id": world.b_tenant, "username": "gus", "password": PASSWORD, "scopes": GOV_RW},
    )
    assert created.status_code == 201 and created.get_json()["tenant_id"] == world.b_tenant


def test_admin_is_granted_only_in_the_platform_tenant(client, runner, world):
    """`admin` crosses tenants, so not even the platform admin may hand it to another tenant."""
    admin = bearer(world.admin_key)
    for path, body in (
        ("/v1/governance/users", {"username": "gus", "password": PASSWORD, "scopes": [sc.ADMIN]}),
        ("/v1/governance/keys", {"name": "second-operator", "scopes": [sc.ADMIN, sc.MODELS_READ]}),
    ):
        resp = client.post(path, headers=admin, json={**body, "tenant_id": world.b_tenant})
        error = assert_error(resp, 400, "admin_outside_platform")["error"]
        assert error["param"] == "scopes" and "'platform'" in error["message"]
        assert client.post(path, headers=admin, json=body).status_code == 201  # in the platform tenant
    result = runner.invoke(args=["keys", "issue", "globex", "--name", "ops", "--scopes", "admin"])
    assert result.exit_code != 0 and "platform" in result.output and "Traceback" not in result.output
    result = runner.invoke(
        args=["users", "create", "globex", "gus2", "--scopes", "admin", "--password", PASSWORD]
    )
    assert result.exit_code != 0 and "platform" in result.output


def test_admin_held_outside_the_platform_tenant_grants_nothing(app, client, world):
    """A key of another tenant that holds `admin` (written before grants were checked) is an
    ordinary key of its tenant: no wildcard scope, no other tenant, no platform-wide change."""
    with app.app_context():
        globex = db.session.get(Tenant, world.b_tenant)
        _, legacy = apikeys.issue_key(globex, "legacy", [sc.MODELS_READ])
        db.session.execute(
            update(ApiKey).where(ApiKey.prefix == legacy[:15]).values(scopes=f"{sc.ADMIN} {sc.MODELS_READ}")
        )
        db.session.commit()
        cache().invalidate()
    me = client.get("/v1/auth/me", headers=bearer(legacy)).get_json()
    assert me["is_admin"] is False and me["scopes"] == [sc.MODELS_READ]
    assert_error(
        client.get(f"/v1/governance/users/{world.a_user}", headers=bearer(legacy)), 403, "insufficient_scope"
    )
    assert_error(
        client.post("/v1/governance/tenants", headers=bearer(legacy), json={"name": "hostile"}),
        403,
        "insufficient_scope",
    )
    form = {"grant_type": "client_credentials", "client_id": legacy[:15], "client_secret": legacy}
    access = client.post("/v1/auth/token", data=form).get_json()["access_token"]
    assert client.get("/v1/auth/me", headers=bearer(access)).get_json()["is_admin"] is False


def test_no_one_grants_a_scope_they_do_not_hold(client, world):
    for path, body in (
        ("/v1/governance/users", {"username": "eve", "password": PASSWORD, "scopes": [sc.ADMIN]}),
        ("/v1/governance/keys", {"name": "escalate", "scopes": [sc.ADMIN]}),
    ):
        assert_error(client.post(path, headers=bearer(world.a_key), json=body), 403, "scope_escalation")


def test_full_key_is_shown_once(client, world):
    created = client.post(
        "/v1/governance/keys", headers=bearer(world.a_key), json={"name": "once"}
    ).get_json()
    assert created["key"].startswith(created["prefix"] + "_")
    assert created["scopes"] == sorted(sc.DEFAULT_KEY_SCOPES)
    fetched = client.get(f"/v1/governance/keys/{created['id']}", headers=bearer(world.a_key)).get_json()
    listed = client.get("/v1/governance/keys", headers=bearer(world.a_key)).get_data(as_text=True)
    assert "key" not in fetched and created["key"] not in listed
    assert client.get("/v1/auth/me", headers=bearer(created["key"])).status_code == 200


# --- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_documents_security_and_scopes(client):
    spec = client.get("/openapi.json").get_json()
    validate(spec)
    create_key = spec["paths"]["/v1/governance/keys"]["post"]
    assert create_key["security"] == [{"oauth2": [sc.GOVERNANCE_WRITE]}, {"bearerAuth": []}]
    flows = spec["components"]["securitySchemes"]["oauth2"]["flows"]
    assert set(flows) == {"password", "clientCredentials"}
    assert flows["password"]["tokenUrl"] == "/v1/auth/token"
    assert set(flows["password"]["scopes"]) == set(sc.SCOPES)
    for path, operations in spec["paths"].items():  # every protected operation names its scopes
        for method, operation in operations.items():
            if "x-required-scopes" in operation:
                wanted = {"oauth2": operation["x-required-scopes"]}
                assert operation["security"][0] == wanted, (method, path)
    assert create_key["x-required-scopes"] == [sc.GOVERNANCE_WRITE]
    assert "governance:write" in create_key["description"]
    assert {"401", "403", "429"} <= set(map(str, create_key["responses"]))
    assert spec["paths"]["/v1/auth/me"]["get"]["x-required-scopes"] == []
    token = spec["paths"]["/v1/auth/token"]["post"]
    assert "application/x-www-form-urlencoded" in token["requestBody"]["content"]
    assert "security" not in token


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_tenants_users_keys(app, runner):
    result = runner.invoke(
        args=["tenants", "create", "acme", "--rate-limit", "100/minute", "--token-quota", "1000"]
    )
    assert result.exit_code == 0, result.output
    assert "acme" in runner.invoke(args=["tenants", "list"]).output
    assert runner.invoke(args=["tenants", "create", "acme"]).exit_code != 0  # duplicate, no traceback
    bad = runner.invoke(args=["tenants", "create", "other", "--rate-limit", "lots"])
    assert bad.exit_code != 0 and "rate limit" in bad.output
    result = runner.invoke(args=["users", "create", "acme", "alice"], input=f"{PASSWORD}\n{PASSWORD}\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        args=["keys", "issue", "acme", "--name", "ci", "--scopes", "models:read", "--user", "alice"]
    )
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    assert apikeys.split_key(key)
    listing = runner.invoke(args=["keys", "list", "--tenant", "acme"]).output
    assert key[:15] in listing and key not in listing and "active" in listing
    assert runner.invoke(args=["keys", "revoke", key[:15]]).exit_code == 0
    assert "revoked" in runner.invoke(args=["keys", "list"]).output
    assert app.test_client().get("/v1/auth/me", headers=bearer(key)).status_code == 401


def test_bootstrap_once_then_never(app, runner):
    # TestingConfig has BOOTSTRAP=false, as production does: nothing happens without --force.
    result = runner.invoke(args=["bootstrap"])
    assert result.exit_code == 0 and "skipped" in result.output
    assert "platform" not in runner.invoke(args=["tenants", "list"]).output
    result = runner.invoke(args=["bootstrap", "--force"])
    assert result.exit_code == 0, result.output
    keys = [word for word in result.output.split() if apikeys.split_key(word.strip("'"))]
    assert len(set(k.strip("'") for k in keys)) == 1 and "curl" in result.output
    key = keys[0].strip("'")
    me = app.test_client().get("/v1/auth/me", headers=bearer(key)).get_json()
    assert me["is_admin"] and me["tenant_name"] == "platform"
    assert {"platform", "demo"} <= set(runner.invoke(args=["tenants", "list"]).output.split())
    again = runner.invoke(args=["bootstrap", "--force"])
    assert again.exit_code == 0 and "skipped" in again.output and "gw-" not in again.output


def test_jwt_revocation_check_fails_closed_when_redis_is_down(monkeypatch, sqlite_url):
    """A revoked token must never pass, so an unreachable blocklist refuses JWTs (API keys still work)."""
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    from app import create_app

    app = create_app()
    world = seed(app)
    client = app.test_client()
    access = password_tokens(client)["access_token"]
    resp = client.get("/v1/auth/me", headers=bearer(access))
    assert_error(resp, 503, "revocation_unavailable")
    assert resp.headers["Retry-After"] == "1"
    assert client.get("/v1/auth/me", headers=bearer(world.a_key)).status_code == 200
