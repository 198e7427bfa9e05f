"""`/docs` and `/redoc` render in a real browser with no internet: Debian's chromium, driven by
Playwright (`executable_path`, no browser download), with every request off 127.0.0.1 refused.

Screenshots are kept in TEST_ARTIFACTS_DIR (default: a temp folder, printed on failure).
"""

from __future__ import annotations

import pytest
import requests

from tests.browser import offline_page
from tests.support import GunicornServer, issue_key

pytestmark = pytest.mark.server


@pytest.fixture
def server(sqlite_url, redis_url):
    with GunicornServer({"DATABASE_URL": sqlite_url, "REDIS_URL": redis_url}, workers=1) as srv:
        yield srv


def test_swagger_ui_renders_offline_and_authorize_works(browser, server, sqlite_url, artifacts):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    key = issue_key(sqlite_url)
    context, page, refused, _, errors = offline_page(browser, server.url)
    try:
        page.goto(server.url + "/docs", wait_until="networkidle")
        page.wait_for_selector(".opblock", timeout=30_000)
        page.screenshot(path=str(artifacts / "swagger-ui.png"), full_page=False)
        rendered = page.locator(".opblock").count()
        operations = sum(
            1
            for item in spec["paths"].values()
            for m in item
            if m in {"get", "post", "put", "patch", "delete"}
        )
        assert rendered == operations, f"{rendered} operations rendered, spec has {operations}"

        # Authorize with a bearer key, then call GET /v1/models from the page.
        page.click("button.authorize")
        bearer = page.locator(".auth-container:has(#auth-bearer-value)")
        bearer.locator("#auth-bearer-value").fill(key)
        bearer.locator("button.authorize").click()
        page.click(".dialog-ux button.close-modal")
        page.wait_for_selector(".dialog-ux", state="detached")
        models = page.locator(".opblock-get:has([data-path='/v1/models'])").first
        models.locator(".opblock-summary").click()
        models.locator("button.try-out__btn").click()
        with page.expect_response(lambda r: r.url == server.url + "/v1/models") as answer:
            models.locator("button.execute").click()
        response = answer.value
        assert response.status == 200, response.text()
        assert response.request.headers.get("authorization") == f"Bearer {key}"
        assert response.json()["object"] == "list"
        page.screenshot(path=str(artifacts / "swagger-ui-authorized.png"), full_page=False)
    finally:
        context.close()
    assert refused == [], f"the page tried to leave our origin: {refused}"
    assert errors == [], errors


def test_redoc_renders_offline(browser, server, artifacts):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    context, page, refused, _, errors = offline_page(browser, server.url)
    try:
        answer = page.goto(server.url + "/redoc", wait_until="networkidle")
        assert "default-src 'self'" in answer.headers["content-security-policy"]
        page.wait_for_selector("h1", timeout=30_000)
        page.screenshot(path=str(artifacts / "redoc.png"), full_page=False)
        assert page.locator("h1").first.inner_text().startswith(spec["info"]["title"])
        # ReDoc's menu lists every operation by its summary (or path).
        summary = spec["paths"]["/v1/chat/completions"]["post"]["summary"]
        assert page.get_by_text(summary).count() >= 1
    finally:
        context.close()
    assert refused == [], f"the page tried to leave our origin: {refused}"
    # The one thing ReDoc's bundle fetches from elsewhere is its sponsor logo: the page's CSP
    # blocks it before any request is made (the image then hides itself).
    assert [e for e in errors if "cdn.redoc.ly/redoc/logo-mini.svg" not in e] == [], errors
