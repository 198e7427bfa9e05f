"""The admin console in-process (Flask test client): login, CSRF, scopes, tenant isolation,
cookie flags and CSP. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import pytest
from sqlalchemy import select

from app.extensions import db
from app.governance.audit.models import AuditRecord
from app.identity import accounts, apikeys
from app.identity import scopes as sc
from app.identity.models import ApiKey

PASSWORD = "correct horse battery staple"
GOV_RW = [sc.GOVERNANCE_READ, sc.GOVERNANCE_WRITE, sc.INFERENCE_INVOKE, sc.MODELS_READ]


CATALOGUE = """
models:
  - name: sentiment
    backend: vader
"""


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    """One small real model, so the registry has something to show and nothing heavy loads."""
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path), "REGISTRY_POLL": "0"}


@dataclass
class World:
    a_tenant: str
    a_key_id: str
    a_prefix: str
    b_tenant: str
    b_key_id: str
    b_prefix: str
    b_key: str
    admin_key: str


@pytest.fixture
def world(app) -> World:
    """acme: alice (read-write) and rita (read-only); globex: bob (read-write) and a key."""
    with app.app_context():
        platform = accounts.create_tenant("platform")
        acme = accounts.create_tenant("acme")
        globex = accounts.create_tenant("globex")
        _, admin_key = apikeys.issue_key(platform, "admin", [sc.ADMIN])
        accounts.create_user(acme, "alice", PASSWORD, GOV_RW)
        accounts.create_user(acme, "rita", PASSWORD, [sc.GOVERNANCE_READ])
        accounts.create_user(globex, "bob", PASSWORD, GOV_RW)
        a_key, _ = apikeys.issue_key(acme, "acme-service", [sc.INFERENCE_INVOKE])
        b_key, b_full = apikeys.issue_key(globex, "globex-service", GOV_RW)
        return World(acme.id, a_key.id, a_key.prefix, globex.id, b_key.id, b_key.prefix, b_full, admin_key)


def csrf(client) -> str:
    """The session's CSRF token, as the login page's form carries it."""
    page = client.get("/console/login").get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def login(client, username: str | None = None, api_key: str | None = None) -> str:
    form = {"csrf_token": csrf(client)}
    form.update({"api_key": api_key} if api_key else {"username": username, "password": PASSWORD})
    resp = client.post("/console/login", data=form)
    assert resp.status_code == 302, resp.get_data(as_text=True)
    assert resp.headers["Location"].endswith("/console/usage")
    # a fresh token after login: the anonymous one is not carried into the session
    return csrf_from(client.get("/console/keys").get_data(as_text=True))


def csrf_from(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def key_row(app, key_id: str) -> ApiKey:
    with app.app_context():
        return db.session.get(ApiKey, key_id)


def test_pages_redirect_to_login_until_logged_in(client, world):
    for path in ("/console/usage", "/console/audit", "/console/keys", "/console/models", "/console/policies"):
        resp = client.get(path)
        assert resp.status_code == 302 and resp.headers["Location"].endswith("/console/login"), path


def test_wrong_password_is_refused_on_the_login_page(client, world):
    resp = client.post(
        "/console/login", data={"csrf_token": csrf(client), "username": "alice", "password": "nope"}
    )
    assert resp.status_code == 401
    assert "Invalid username or password." in resp.get_data(as_text=True)
    assert client.get("/console/usage").status_code == 302


def test_post_without_or_with_a_wrong_csrf_token_is_refused(app, client, world):
    token = login(client, "alice")
    for form in ({}, {"csrf_token": "forged"}, {"csrf_token": token + "x"}):
        resp = client.post("/console/keys", data={"name": "sneaky", **form})
        assert resp.status_code == 400, form
        assert "security token" in resp.get_data(as_text=True)
        resp = client.post(f"/console/keys/{world.a_key_id}/revoke", data=form)
        assert resp.status_code == 400
    with app.app_context():
        assert db.session.scalar(select(ApiKey).where(ApiKey.name == "sneaky")) is None
    assert key_row(app, world.a_key_id).revoked_at is None
    # the login form is protected too (no login CSRF)
    fresh = app.test_client()
    assert fresh.post("/console/login", data={"username": "alice", "password": PASSWORD}).status_code == 400


def test_read_only_user_sees_keys_but_cannot_revoke_or_issue(app, client, world):
    token = login(client, "rita")
    page = client.get("/console/keys")
    assert page.status_code == 200 and world.a_prefix in page.get_data(as_text=True)
    resp = client.post(f"/console/keys/{world.a_key_id}/revoke", data={"csrf_token": token})
    assert resp.status_code == 403
    body = resp.get_data(as_text=True)
    assert "governance:write" in body and "insufficient_scope" in body and "Traceback" not in body
    assert client.post("/console/keys", data={"csrf_token": token, "name": "x"}).status_code == 403
    assert key_row(app, world.a_key_id).revoked_at is None
    # the registry is the platform admin's, as in the API
    assert client.post("/console/models/sentiment/promote", data={"csrf_token": token}).status_code == 403


def test_issue_shows_the_secret_once_and_revoke_is_audited(app, client, world):
    token = login(client, "alice")
    resp = client.post(
        "/console/keys",
        data={"csrf_token": token, "name": "from-console", "scopes": ["inference:invoke"]},
        buffered=True,  # closes the response, as a WSGI server does, which submits its audit record
    )
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    full = re.search(r'id="new-key-value">(gw-[^<]+)<', resp.get_data(as_text=True)).group(1)
    assert client.get("/v1/auth/me", headers={"Authorization": f"Bearer {full}"}).status_code == 200
    assert full not in client.get("/console/keys").get_data(as_text=True)

    with app.app_context():
        created = db.session.scalar(select(ApiKey).where(ApiKey.name == "from-console"))
        assert created.scopes == "inference:invoke" and created.tenant_id == world.a_tenant
    resp = client.post(f"/console/keys/{created.id}/revoke", data={"csrf_token": token}, buffered=True)
    assert resp.status_code == 302
    refused = client.get("/v1/auth/me", headers={"Authorization": f"Bearer {full}"})
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "invalid_api_key"

    app.extensions["audit"].flush()
    with app.app_context():
        actions = db.session.scalars(
            select(AuditRecord.action).where(AuditRecord.kind == "admin", AuditRecord.status < 400)
        ).all()
    assert {"console.issue_key", "console.revoke"} <= set(actions)


def test_another_tenants_keys_and_audit_never_show(app, client, world):
    # globex leaves audit records: bob issues a key through the API
    other = client.post(
        "/v1/governance/keys",
        json={"name": "globex-made", "scopes": ["inference:invoke"]},
        headers={"Authorization": f"Bearer {world.b_key}"},
        buffered=True,
    )
    assert other.status_code == 201
    app.extensions["audit"].flush()

    token = login(client, "alice")
    keys = client.get("/console/keys").get_data(as_text=True)
    assert world.a_prefix in keys
    assert world.b_prefix not in keys and "globex-made" not in keys
    audit = client.get("/console/audit").get_data(as_text=True)
    assert other.headers["X-Request-ID"] not in audit and world.b_tenant not in audit
    assert client.get(f"/console/audit?tenant_id={world.b_tenant}").status_code == 403
    assert client.get(f"/console/usage?tenant_id={world.b_tenant}").status_code == 403
    # another tenant's key is not found (not even confirmed to exist), and stays active
    other_revoke = client.post(f"/console/keys/{world.b_key_id}/revoke", data={"csrf_token": token})
    assert other_revoke.status_code == 404
    assert key_row(app, world.b_key_id).revoked_at is None


def test_api_key_login_and_logout_revokes_the_session_token(app, client, world):
    login(client, api_key=world.b_key)
    assert "globex-service" in client.get("/console/keys").get_data(as_text=True)
    with client.session_transaction("/console/keys") as session:
        access = session["access"]
        assert world.b_key not in str(dict(session))  # the key was exchanged, not stored
    me = client.get("/v1/auth/me", headers={"Authorization": f"Bearer {access}"})
    assert me.status_code == 200 and me.get_json()["kind"] == "api_key"
    token = csrf_from(client.get("/console/keys").get_data(as_text=True))
    assert client.post("/console/logout", data={"csrf_token": token}).status_code == 302
    after = client.get("/v1/auth/me", headers={"Authorization": f"Bearer {access}"})
    assert after.status_code == 401 and after.get_json()["error"]["code"] == "token_revoked"
    assert client.get("/console/keys").status_code == 302


def test_security_headers_and_cookie_flags(app, world):
    client = app.test_client()
    resp = client.get("/console/login")
    csp = resp.headers["Content-Security-Policy"]
    directives = ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'")
    for directive in directives:
        assert directive in csp
    assert "unsafe-inline" not in csp
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    secure = app.test_client().get("/console/login", base_url="https://localhost")
    assert "Secure" in secure.headers["Set-Cookie"]
    # the console is not part of the API's OpenAPI document
    assert not [p for p in client.get("/openapi.json").get_json()["paths"] if p.startswith("/console")]


def test_policy_edit_needs_write_and_valid_json(client, world):
    token = login(client, "alice")
    bad = client.post("/console/policies", data={"csrf_token": token, "rules": "{not json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.get_data(as_text=True)
    invalid = client.post("/console/policies", data={"csrf_token": token, "rules": '{"max_tokens": -3}'})
    assert invalid.status_code == 400
    ok = client.post("/console/policies", data={"csrf_token": token, "rules": '{"max_tokens": 64}'})
    assert ok.status_code == 302
    page = html.unescape(client.get("/console/policies").get_data(as_text=True))
    assert "version 1" in page and '"max_tokens": 64' in page


def test_an_expired_access_token_is_renewed_with_the_refresh_token(app, client, world):
    """A password session outlives its 15-minute access token: the single-use refresh token is
    rotated, and the renewed session works. The expired token is made, not waited for."""
    from datetime import timedelta

    from flask_jwt_extended import create_access_token, decode_token

    login(client, "alice")
    with client.session_transaction("/console/keys") as session:
        refresh = session["refresh"]
        with app.app_context():
            claims = decode_token(session["access"])
            extra = {k: claims[k] for k in ("tenant", "scopes", "kind", "key_id", "user_id", "rjti", "rexp")}
            session["access"] = create_access_token(
                claims["sub"], additional_claims=extra, expires_delta=timedelta(seconds=-1)
            )
    assert client.get("/console/keys").status_code == 200
    with client.session_transaction("/console/keys") as session:
        assert session["refresh"] != refresh
    used = client.post("/v1/auth/refresh", headers={"Authorization": f"Bearer {refresh}"})
    assert used.status_code == 401 and used.get_json()["error"]["code"] == "token_revoked"


def test_scripts_get_the_api_error_shape_and_browsers_a_page(client, world):
    """A client asking for JSON (or sending it) gets the gateway's one error shape; a browser a page."""
    scripted = client.get("/console/keys", headers={"Accept": "application/json"})
    assert scripted.status_code == 401
    assert set(scripted.get_json()) == {"error", "request_id"}
    assert set(scripted.get_json()["error"]) == {"message", "type", "param", "code"}
    big = client.post("/console/keys", data={"name": "x" * (2 * 1024 * 1024)})
    assert big.status_code == 413 and big.mimetype == "text/html"
    assert "413" in big.get_data(as_text=True)


def test_admin_sets_canary_traffic_and_rolls_back(client, world):
    admin = {"Authorization": f"Bearer {world.admin_key}"}
    added = client.post(
        "/v1/governance/models/sentiment/versions", json={"version": "2", "backend": "vader"}, headers=admin
    )
    assert added.status_code == 201
    token = login(client, api_key=world.admin_key)
    base = "/console/models/sentiment"
    bad = client.post(
        base + "/traffic", data={"csrf_token": token, "canary_version": "2", "canary_weight": "150"}
    )
    assert bad.status_code == 400 and "canary_weight" in bad.get_data(as_text=True)
    ok = client.post(
        base + "/traffic", data={"csrf_token": token, "canary_version": "2", "canary_weight": "25"}
    )
    assert ok.status_code == 302
    state = client.get("/v1/governance/models/sentiment", headers=admin).get_json()
    assert (state["canary_version"], state["canary_weight"]) == ("2", 25.0)
    assert client.post(base + "/rollback", data={"csrf_token": token}).status_code == 302
    state = client.get("/v1/governance/models/sentiment", headers=admin).get_json()
    assert (state["active_version"], state["canary_version"]) == ("1", None)
    nothing = client.post(base + "/promote", data={"csrf_token": token})
    assert nothing.status_code == 409 and "no canary" in nothing.get_data(as_text=True)
