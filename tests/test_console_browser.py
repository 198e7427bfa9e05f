"""The admin console in a real browser (Debian's chromium via Playwright, as in
test_docs_browser.py) against real gunicorn+gevent, Redis and real vader inference; every request
off our origin is refused and remembered, and any CSP violation shows up as a console error.

Screenshots are kept in TEST_ARTIFACTS_DIR (default: a temp folder).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
import requests

from tests.browser import offline_page
from tests.support import GunicornServer, environ, issue_key

pytestmark = pytest.mark.server

PASSWORD = "correct horse battery staple"
CATALOGUE = """
models:
  - name: sentiment
    backend: vader
"""
TENSOR = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}
INFERENCES = 3


def seed_users(database_url: str) -> None:
    """alice runs acme's governance; root is the platform admin. Both log in with a password."""
    from app import create_app
    from app.extensions import db
    from app.identity import accounts
    from app.identity.models import Tenant

    with environ(DATABASE_URL=database_url):
        app = create_app()
    with app.app_context():
        tenants = {t.name: t for t in db.session.scalars(db.select(Tenant))}
        platform = tenants.get("platform") or accounts.create_tenant("platform")
        acme = tenants.get("acme") or accounts.create_tenant("acme")
        scopes = ["governance:read", "governance:write", "inference:invoke", "models:read"]
        accounts.create_user(acme, "alice", PASSWORD, scopes)
        accounts.create_user(platform, "root", PASSWORD, ["admin"])
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def server(sqlite_url, redis_url, tmp_path):
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(CATALOGUE)
    seed_users(sqlite_url)
    env = {
        "DATABASE_URL": sqlite_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(catalogue),
        "MODELS_DIR": str(tmp_path),
        "REGISTRY_POLL": "0",
    }
    with GunicornServer(env, workers=1, ready_path="/readyz") as srv:
        yield srv


def login(page, origin: str, username: str) -> None:
    answer = page.goto(origin + "/console/login")
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    form = page.locator("#password-login")
    form.locator("input[name=username]").fill(username)
    form.locator("input[name=password]").fill(PASSWORD)
    form.locator("button[type=submit]").click()
    page.wait_for_url("**/console/usage")


def wait_for_usage(origin: str, key: str, requests_expected: int) -> None:
    """Audit records (which usage reads) are written off the request path: wait until they are."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = requests.get(
            origin + "/v1/governance/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()["data"]
        if sum(r["requests"] for r in rows) >= requests_expected:
            return
        time.sleep(0.2)
    raise AssertionError("the usage report never counted the requests")


def test_usage_chart_audit_and_keys(browser, server, sqlite_url, artifacts):
    invoke = issue_key(sqlite_url, "acme", ("inference:invoke", "governance:read"))
    for _ in range(INFERENCES):
        resp = requests.post(
            server.url + "/v2/models/sentiment/infer",
            json={"inputs": [TENSOR]},
            headers={"Authorization": f"Bearer {invoke}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
    wait_for_usage(server.url, invoke, INFERENCES)

    context, page, refused, scripts, errors = offline_page(browser, server.url)
    try:
        login(page, server.url, "alice")
        page.wait_for_selector("#usage-chart[data-rendered=true]")
        plotted = page.evaluate(
            """() => Chart.getChart(document.getElementById('usage-chart')).data.datasets
                 .map(d => [d.label, d.data.reduce((a, b) => a + b, 0)])"""
        )
        assert plotted == [["sentiment", INFERENCES]]
        assert page.locator("#usage-table tbody tr").count() == 1
        page.screenshot(path=str(artifacts / "console-usage.png"), full_page=True)

        page.goto(server.url + "/console/audit?kind=inference")
        assert page.locator("#audit-table tbody tr").count() == INFERENCES
        page.click("#verify-chain")
        assert page.locator("#verify-result").inner_text().startswith("Intact")

        page.goto(server.url + "/console/keys")
        page.fill("#issue-key input[name=name]", "browser-key")
        page.click("#issue-key button[type=submit]")
        secret = page.locator("#new-key-value").inner_text().strip()
        page.screenshot(path=str(artifacts / "console-key-issued.png"), full_page=True)
        infer = {"json": {"inputs": [TENSOR]}, "headers": {"Authorization": f"Bearer {secret}"}}
        accepted = requests.post(server.url + "/v2/models/sentiment/infer", timeout=30, **infer)
        assert accepted.status_code == 200

        prefix = secret.split("_")[0]
        page.goto(server.url + "/console/keys")  # the secret is gone from the page once left
        assert secret not in page.content()
        row = page.locator(f"#keys-table tr[data-prefix='{prefix}']")
        row.locator("button.danger").click()
        page.wait_for_selector(f"#keys-table tr[data-prefix='{prefix}'] td.state:text('revoked')")
        refused_call = requests.post(server.url + "/v2/models/sentiment/infer", timeout=30, **infer)
        assert refused_call.status_code == 401
        body = refused_call.json()
        assert set(body) == {"error", "request_id"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == "invalid_api_key"
    finally:
        context.close()
    assert refused == [], f"a console page tried to leave our origin: {refused}"
    assert scripts and all(urlsplit(s).netloc == urlsplit(server.url).netloc for s in scripts)
    assert errors == [], errors


def test_platform_admin_promotes_a_canary(browser, server, sqlite_url, artifacts):
    admin_key = {"Authorization": f"Bearer {issue_key(sqlite_url, 'platform', ('admin',))}"}
    base = server.url + "/v1/governance/models/sentiment"
    resp = requests.post(base + "/versions", json={"version": "2", "backend": "vader"}, headers=admin_key)
    assert resp.status_code == 201, resp.text
    resp = requests.put(
        base + "/traffic", json={"canary_version": "2", "canary_weight": 20}, headers=admin_key, timeout=10
    )
    assert resp.status_code == 200, resp.text

    context, page, refused, _, errors = offline_page(browser, server.url)
    try:
        login(page, server.url, "root")
        page.goto(server.url + "/console/models")
        model = page.locator("section[data-model=sentiment]")
        assert model.locator(".canary-version").inner_text() == "2"
        assert model.locator(".canary-weight").inner_text() == "20"
        model.locator("button.promote").click()
        page.wait_for_url("**/console/models")
        model = page.locator("section[data-model=sentiment]")
        assert model.locator(".active-version").inner_text() == "2"
        assert model.locator(".canary-version").inner_text() == "none"
        page.screenshot(path=str(artifacts / "console-models.png"), full_page=True)
    finally:
        context.close()
    state = requests.get(base, headers=admin_key, timeout=10).json()
    assert (state["active_version"], state["previous_version"], state["canary_version"]) == ("2", "1", None)
    assert refused == [] and errors == [], (refused, errors)
