"""One tenant-scoping rule on every governance route that takes a `tenant_id`, query or body.

The routes are read from the app's own OpenAPI document, so a route added later with a
`tenant_id` is swept too: its body needs an entry in BODIES, and the sweep fails until it has one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from app.identity import accounts, apikeys
from app.identity import scopes as sc

GOV = [sc.GOVERNANCE_READ, sc.GOVERNANCE_WRITE, sc.INFERENCE_INVOKE, sc.MODELS_READ]
_serial = itertools.count()

# A valid body per route taking `tenant_id` in its JSON body (the tenant is added by the test).
BODIES: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
    ("POST", "/v1/governance/users"): lambda: {
        "username": f"sweep{next(_serial)}",
        "password": "correct horse battery staple",
        "scopes": [sc.INFERENCE_INVOKE],
    },
    ("POST", "/v1/governance/keys"): lambda: {"name": f"sweep{next(_serial)}", "scopes": [sc.MODELS_READ]},
    ("PUT", "/v1/governance/policies"): lambda: {"rules": {"max_tokens": 64}},
}


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def tenant_routes(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(method, path, "query" | "body") for every governance operation that takes tenant_id."""
    found = []
    for path, item in spec["paths"].items():
        if not path.startswith("/v1/governance"):
            continue
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            params = operation.get("parameters", []) + item.get("parameters", [])
            if any(p.get("name") == "tenant_id" and p.get("in") == "query" for p in params):
                found.append((method.upper(), path, "query"))
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body and "tenant_id" in _resolve(spec, body["schema"]).get("properties", {}):
                found.append((method.upper(), path, "body"))
    return sorted(found)


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    """vader only: these tests read the document and validation, not the models."""
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: vader-sentiment\n    aliases: [vader]\n    backend: vader\n")
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path)}


@pytest.fixture
def tenants(app) -> dict[str, str]:
    with app.app_context():
        platform = accounts.create_tenant("platform")
        acme = accounts.create_tenant("acme")
        globex = accounts.create_tenant("globex")
        _, admin = apikeys.issue_key(platform, "admin", [sc.ADMIN])
        _, acme_key = apikeys.issue_key(acme, "acme-gov", GOV)
        apikeys.issue_key(globex, "globex-gov", GOV)
        return {"admin": admin, "acme_key": acme_key, "acme": acme.id, "globex": globex.id}


# Values for path parameters, so a route like /models/{name}/drift reaches a real resource.
PATH_VALUES = {"name": "vader-sentiment"}


def _call(client, method: str, path: str, where: str, key: str, tenant_id: str):
    headers = {"Authorization": f"Bearer {key}"}
    url = path.format(**PATH_VALUES)
    if where == "query":
        return client.open(url, method=method, headers=headers, query_string={"tenant_id": tenant_id})
    assert (method, path) in BODIES, f"{method} {path} takes tenant_id in its body: add it to BODIES"
    return client.open(
        url, method=method, headers=headers, json={**BODIES[(method, path)](), "tenant_id": tenant_id}
    )


@pytest.fixture
def routes(client) -> list[tuple[str, str, str]]:
    return tenant_routes(client.get("/openapi.json").get_json())


def test_the_sweep_finds_query_and_body_routes(routes):
    assert {where for *_, where in routes} == {"query", "body"}
    assert ("GET", "/v1/governance/keys", "query") in routes and len(routes) >= 10, routes


def test_a_tenant_naming_another_tenant_is_refused_everywhere(client, tenants, routes):
    refused = {}
    for method, path, where in routes:
        resp = _call(client, method, path, where, tenants["acme_key"], tenants["globex"])
        body = resp.get_json(silent=True) or {}
        error = body.get("error") or {}
        if (resp.status_code, error.get("code"), error.get("param")) != (403, "cross_tenant", "tenant_id"):
            refused[f"{method} {path} ({where})"] = (resp.status_code, resp.get_data(as_text=True)[:200])
    assert refused == {}, "these routes do not apply the tenant-scoping rule"


def test_a_tenant_naming_itself_and_the_admin_naming_any_tenant_are_served(client, tenants, routes):
    failed = {}
    for method, path, where in routes:
        for key, tenant in ((tenants["acme_key"], tenants["acme"]), (tenants["admin"], tenants["globex"])):
            resp = _call(client, method, path, where, key, tenant)
            if not 200 <= resp.status_code < 300:
                failed[f"{method} {path} ({where})"] = (resp.status_code, resp.get_data(as_text=True)[:200])
                continue
            body = resp.get_json(silent=True)
            rows = body.get("data") if isinstance(body, dict) else None
            if isinstance(rows, list):  # a list names only the tenant asked for
                assert {r.get("tenant_id", tenant) for r in rows} <= {tenant}, (method, path, rows)
    assert failed == {}
