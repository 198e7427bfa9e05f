"""Request schemas exactly as strict as validation: what the document allows is accepted, what
it refuses is refused, with a documented status (found by schemathesis, pinned here)."""

from __future__ import annotations

import re

import pytest

from app.identity import accounts, apikeys
from app.identity import scopes as sc


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    """vader only: these tests read the document and validation, not the models."""
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: vader-sentiment\n    aliases: [vader]\n    backend: vader\n")
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path)}


@pytest.fixture
def admin(app) -> dict[str, str]:
    with app.app_context():
        platform = accounts.create_tenant("platform")
        tenant = accounts.create_tenant("acme")
        _, key = apikeys.issue_key(platform, "admin", [sc.ADMIN])
        return {"Authorization": f"Bearer {key}", "tenant": tenant.id}


@pytest.fixture
def spec(client) -> dict:
    return client.get("/openapi.json").get_json()


def _schema(spec: dict, name: str) -> dict:
    return spec["components"]["schemas"][name]


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error", "request_id"}
    return body["error"]


def test_a_required_body_that_is_missing_is_refused(client, admin, spec):
    operation = spec["paths"]["/v1/governance/tenants/{tenant_id}"]["patch"]
    assert operation["requestBody"]["required"] is True and "422" in operation["responses"]
    headers = {"Authorization": admin["Authorization"]}
    resp = client.patch(f"/v1/governance/tenants/{admin['tenant']}", headers=headers)
    assert "body is required" in _error(resp, 422)["message"]
    # An empty object is a body: a PATCH that changes nothing.
    assert (
        client.patch(f"/v1/governance/tenants/{admin['tenant']}", headers=headers, json={}).status_code == 200
    )


@pytest.mark.parametrize("value", ["5", 5.0, 5.5, True])
def test_integers_are_json_integers(client, admin, value):
    headers = {"Authorization": admin["Authorization"]}
    resp = client.post("/v1/governance/tenants", headers=headers, json={"name": "t1", "token_quota": value})
    assert _error(resp, 422)["param"] == "token_quota"
    resp = client.put("/v1/governance/policies", headers=headers, json={"rules": {"max_tokens": value}})
    assert _error(resp, 422)["param"] == "rules.max_tokens"


@pytest.mark.parametrize("value", [0, 1, "true", "yes", None])
def test_booleans_are_json_booleans(client, admin, value):
    headers = {"Authorization": admin["Authorization"]}
    resp = client.put(
        "/v1/governance/policies", headers=headers, json={"rules": {"audit_raw_content": value}}
    )
    assert _error(resp, 422)["param"] == "rules.audit_raw_content"
    tenant = f"/v1/governance/tenants/{admin['tenant']}"
    assert _error(client.patch(tenant, headers=headers, json={"active": value}), 422)["param"] == "active"


def test_strict_values_that_are_right_are_accepted(client, admin):
    headers = {"Authorization": admin["Authorization"]}
    resp = client.post("/v1/governance/tenants", headers=headers, json={"name": "t2", "token_quota": 5})
    assert resp.status_code == 201 and resp.get_json()["token_quota"] == 5
    rules = {"max_tokens": 8, "audit_raw_content": True, "redact_output": False}
    assert client.put("/v1/governance/policies", headers=headers, json={"rules": rules}).status_code == 201


def test_scopes_are_an_enum_of_known_scopes(client, admin, spec):
    items = _schema(spec, "User")["properties"]["scopes"]["items"]
    assert set(items["enum"]) == set(sc.SCOPES)
    body = {"username": "alice", "password": "correct horse battery", "scopes": [""]}
    resp = client.post("/v1/governance/users", headers={"Authorization": admin["Authorization"]}, json=body)
    assert _error(resp, 422)["param"] == "scopes.0"


def test_rate_limits_follow_the_documented_pattern(client, admin, spec):
    pattern = _schema(spec, "Tenant")["properties"]["rate_limit"]["pattern"]
    headers = {"Authorization": admin["Authorization"]}
    for good in ("600/minute", "10/second;600/minute", "1 per 2 hours"):
        assert re.match(pattern, good)
        resp = client.post("/v1/governance/tenants", headers=headers, json={"name": "t3", "rate_limit": good})
        assert resp.status_code in (201, 409), resp.get_data(as_text=True)
    for bad in ("fast", "10/fortnight", "600/MINUTE"):
        assert not re.match(pattern, bad)
        resp = client.post("/v1/governance/tenants", headers=headers, json={"name": "t4", "rate_limit": bad})
        assert _error(resp, 422)["param"] == "rate_limit"


def test_v2_tensor_data_is_a_list_of_values_never_null(client, admin, spec):
    data = _schema(spec, "Tensor")["properties"]["data"]
    assert data["type"] == "array" and "null" not in {t["type"] for t in data["items"]["oneOf"]}
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": None}
    resp = client.post(
        "/v2/models/vader/infer", headers={"Authorization": admin["Authorization"]}, json={"inputs": [tensor]}
    )
    assert _error(resp, 422)["param"] == "inputs.0.data"


def test_revoke_documents_its_refusal_of_api_keys(client, admin, spec):
    assert "400" in spec["paths"]["/v1/auth/revoke"]["post"]["responses"]
    resp = client.post("/v1/auth/revoke", headers={"Authorization": admin["Authorization"]})
    _error(resp, 400)


def test_the_token_form_documents_what_it_accepts(client, spec):
    form = spec["paths"]["/v1/auth/token"]["post"]["requestBody"]["content"][
        "application/x-www-form-urlencoded"
    ]
    schema = form["schema"]
    schema = _schema(spec, schema["$ref"].rsplit("/", 1)[-1]) if "$ref" in schema else schema
    assert schema["required"] == ["grant_type"]
    assert set(schema["properties"]["grant_type"]["enum"]) == {"password", "client_credentials"}
    assert re.match(schema["properties"]["scope"]["pattern"], "models:read inference:invoke")
    assert not re.match(schema["properties"]["scope"]["pattern"], "root")
    # Refusals keep RFC 6749's 400 and codes, never a 422.
    for data, code in (
        ({}, "invalid_request"),
        ({"grant_type": "implicit"}, "unsupported_grant_type"),
        ({"grant_type": "password", "username": "", "password": "x"}, "invalid_request"),
        ({"grant_type": "password", "username": "a", "password": "b", "scope": "root"}, "invalid_scope"),
    ):
        assert _error(client.post("/v1/auth/token", data=data), 400)["code"] == code
