"""The gateway mounted into someone else's Flask app (examples/existing_app): the host keeps its
routes, login and error pages; ours answer under the prefix in our shape; a model family from
another installed package answers through /v1/chat/completions."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

import pytest

from tests import support

sys.path.insert(0, str(support.ROOT / "examples" / "existing_app"))

CATALOGUE = """
models:
  - name: shop-faq
    backend: faq
    params:
      answers:
        shipping: "Orders ship within two working days."
        returns: "You can return any item within 30 days."
      fallback: "Sorry, I can only answer questions about shipping and returns."
  - name: sentiment
    backend: vader
"""


@pytest.fixture
def shop(database_url, tmp_path, monkeypatch):
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    monkeypatch.setenv("DATABASE_URL", database_url)
    from shop import create_app

    app = create_app(
        {
            "MODELS_CONFIG": str(path),
            "MODELS_DIR": str(tmp_path),
            "MODELS_LOAD": "eager",
            "REGISTRY_POLL": 0,
            "INSTANCE_PATH": str(tmp_path / "instance"),
        }
    )
    yield app
    from app.governance import audit

    audit.shutdown(app)
    app.extensions["usage_ledger"].close()


def test_our_five_backends_and_the_custom_one_are_entry_points():
    names = {ep.name for ep in entry_points(group="flask_ai_gateway.backends")}
    assert {"llama_cpp", "openai_compatible", "sentence_transformers", "sklearn", "vader", "faq"} <= names


def test_the_host_keeps_its_routes_login_and_error_pages(shop):
    client = shop.test_client()
    assert "The shop" in client.get("/").get_data(as_text=True)
    assert client.get("/orders").status_code == 302  # its own login guard
    bad = client.post("/login", data={"username": "alice", "password": "nope"})
    assert "Wrong username or password" in bad.get_data(as_text=True)
    client.post("/login", data={"username": "alice", "password": "wonderland"})
    assert "#1001 teapot" in client.get("/orders").get_data(as_text=True)
    missing = client.get("/no-such-page")
    assert missing.status_code == 404 and "This shop page does not exist" in missing.get_data(as_text=True)
    assert missing.mimetype == "text/html"


def test_the_gateway_answers_under_its_prefix_in_its_shape(shop, database_url):
    client = shop.test_client()
    assert client.get("/ai/healthz").get_json() == {"status": "ok"}
    assert client.get("/healthz").status_code == 404  # nothing of ours outside the prefix
    missing = client.get("/ai/v1/no-such-route")
    assert missing.status_code == 404 and missing.get_json()["error"]["type"] == "not_found_error"
    refused = client.get("/ai/v1/models")
    assert refused.status_code == 401 and refused.get_json()["error"]["code"]
    spec = client.get("/ai/openapi.json").get_json()
    assert "/ai/v1/chat/completions" in spec["paths"] and "/orders" not in spec["paths"]
    assert (
        spec["components"]["securitySchemes"]["oauth2"]["flows"]["password"]["tokenUrl"]
        == "/ai/v1/auth/token"
    )
    assert "swagger" in client.get("/ai/docs").get_data(as_text=True).lower()
    assert client.get("/ai/docs/assets/swagger-ui/swagger-ui-bundle.js").status_code == 200
    # The console lives under the prefix with its own cookie; the host's session cookie is its own.
    login = client.get("/ai/console/login")
    assert login.status_code == 200 and "csrf" in login.get_data(as_text=True).lower()
    assert client.get_cookie("gw_console", path="/ai/console") is not None
    assert client.get_cookie("session") is None


def test_the_custom_backend_answers_through_chat_completions(shop, database_url):
    key = support.issue_key(database_url)
    client = shop.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    models = client.get("/ai/v1/models", headers=headers).get_json()
    assert "shop-faq" in {m["id"] for m in models["data"]}
    body = {"model": "shop-faq", "messages": [{"role": "user", "content": "How long does shipping take?"}]}
    resp = client.post("/ai/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == 200, resp.get_json()
    reply = resp.get_json()
    assert reply["choices"][0]["message"]["content"] == "Orders ship within two working days."
    assert reply["usage"]["completion_tokens"] == 6 and reply["usage"]["prompt_tokens"] == 5
    streamed = client.post("/ai/v1/chat/completions", json={**body, "stream": True}, headers=headers)
    text = streamed.get_data(as_text=True)
    assert streamed.status_code == 200 and text.rstrip().endswith("data: [DONE]")
    assert '"content": " within"' in text or '"content":" within"' in text
    # Policies and scopes apply to it like any other model: a key without inference scope is refused.
    reader = support.issue_key(database_url, tenant="readers", scopes=("models:read",))
    denied = client.post("/ai/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {reader}"})
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "insufficient_scope"
