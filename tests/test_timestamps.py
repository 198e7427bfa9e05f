"""Every governance timestamp is timezone-aware UTC on the wire (`format: date-time` is RFC 3339,
which requires an offset), on SQLite (which keeps no time zone) and PostgreSQL alike; `since` and
`until` accept aware inputs in any offset."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from tests.test_identity import World, bearer, seed

CATALOGUE = """
models:
  - name: sentiment
    backend: vader
"""
TENSOR = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}


@pytest.fixture
def database_url(any_database_url: str) -> str:
    return any_database_url


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path), "REGISTRY_POLL": "0"}


def date_time_fields(spec: dict[str, Any]) -> set[str]:
    """Every property the OpenAPI document declares `format: date-time`."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                if isinstance(prop, dict) and prop.get("format") == "date-time":
                    found.add(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    return found


def assert_utc(value: str, where: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() == timedelta(0), f"{where}: {value!r} has no UTC offset"
    return parsed


def traffic(app, client, world: World) -> dict[str, str]:
    """Something behind every timestamp: a used key, an expiring revoked key, a policy, a model
    version added through the API, and audit records of both kinds."""
    created = client.post(
        "/v1/governance/keys",
        headers=bearer(world.a_key),
        json={"name": "temporary", "expires_at": "2030-01-01T02:00:00+02:00"},
    )
    assert created.status_code == 201, created.get_json()
    key_id = created.get_json()["id"]
    assert client.post(f"/v1/governance/keys/{key_id}/revoke", headers=bearer(world.a_key)).status_code == 200
    policy = client.put("/v1/governance/policies", headers=bearer(world.a_key), json={"rules": {}})
    assert policy.status_code == 201, policy.get_json()
    version = client.post(
        "/v1/governance/models/sentiment/versions",
        headers=bearer(world.admin_key),
        json={"version": "2", "backend": "vader"},
    )
    assert version.status_code == 201, version.get_json()
    served = client.post(
        "/v2/models/sentiment/infer",
        headers=bearer(world.a_inference_key),
        json={"inputs": [TENSOR]},
        buffered=True,
    )
    assert served.status_code == 200, served.get_json()
    app.extensions["audit"].flush()
    return {"key_id": key_id}


def test_every_governance_date_time_is_utc_with_an_offset(app, client):
    world = seed(app)
    ids = traffic(app, client, world)
    fields = date_time_fields(client.get("/openapi.json").get_json())
    assert {"created_at", "revoked_at", "expires_at", "last_used_at", "ts", "since", "computed_at"} <= fields

    routes = [
        "/v1/governance/tenants",
        f"/v1/governance/tenants/{world.a_tenant}",
        f"/v1/governance/users?tenant_id={world.a_tenant}",
        f"/v1/governance/users/{world.a_user}",
        f"/v1/governance/keys?tenant_id={world.a_tenant}",
        f"/v1/governance/keys/{ids['key_id']}",
        f"/v1/governance/policies?tenant_id={world.a_tenant}",
        f"/v1/governance/policies/versions?tenant_id={world.a_tenant}",
        "/v1/governance/models",
        "/v1/governance/models/sentiment",
        "/v1/governance/models/sentiment/drift",
        "/v1/governance/audit",
        "/v1/governance/usage",
    ]
    checked: set[tuple[str, str]] = set()

    def walk(route: str, node: Any) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                if name in fields and isinstance(value, str):
                    assert_utc(value, f"{route} {name}")
                    checked.add((route.split("?")[0], name))
                walk(route, value)
        elif isinstance(node, list):
            for value in node:
                walk(route, value)

    for route in routes:
        resp = client.get(route, headers=bearer(world.admin_key))
        assert resp.status_code == 200, (route, resp.get_json())
        walk(route, resp.get_json())
    # Every route showed its timestamps, the nullable ones set: the sweep cannot pass vacuously.
    key_route = f"/v1/governance/keys/{ids['key_id']}"
    assert {(key_route, "created_at"), (key_route, "revoked_at"), (key_route, "expires_at")} <= checked
    assert ("/v1/governance/keys", "last_used_at") in checked
    assert {("/v1/governance/audit", "ts"), ("/v1/governance/usage", "since")} <= checked
    assert ("/v1/governance/models/sentiment/drift", "computed_at") in checked
    assert {route.split("?")[0] for route, _ in checked} == {route.split("?")[0] for route in routes}
    key = client.get(key_route, headers=bearer(world.admin_key)).get_json()
    assert assert_utc(key["expires_at"], "expires_at") == datetime(2030, 1, 1, tzinfo=UTC)

    jsonl = client.get("/v1/governance/audit/export", headers=bearer(world.admin_key))
    lines = [json.loads(line) for line in jsonl.get_data(as_text=True).splitlines()]
    assert lines and all(assert_utc(line["ts"], "export ts") for line in lines)
    exported = client.get("/v1/governance/audit/export?format=csv", headers=bearer(world.admin_key))
    rows = list(csv.DictReader(io.StringIO(exported.get_data(as_text=True))))
    assert len(rows) == len(lines) and all(assert_utc(row["ts"], "csv ts") for row in rows)
    verified = client.get("/v1/governance/audit/verify", headers=bearer(world.admin_key)).get_json()
    assert verified["ok"] is True and verified["records"] == len(lines)


def test_since_and_until_accept_aware_inputs_in_any_offset(app, client):
    world = seed(app)
    traffic(app, client, world)
    admin = bearer(world.admin_key)
    now = datetime.now(UTC)
    records = client.get("/v1/governance/audit", headers=admin).get_json()["data"]
    assert records
    # One instant, three spellings: naive (taken as UTC), Z, and +02:00.
    hour_ago = now - timedelta(hours=1)
    spellings = [
        hour_ago.replace(tzinfo=None).isoformat(),
        hour_ago.isoformat().replace("+00:00", "Z"),
        hour_ago.astimezone(timezone(timedelta(hours=2))).isoformat(),
    ]
    for since in spellings:
        listed = client.get("/v1/governance/audit", headers=admin, query_string={"since": since})
        assert listed.status_code == 200 and len(listed.get_json()["data"]) == len(records), since
        usage = client.get("/v1/governance/usage", headers=admin, query_string={"since": since})
        assert usage.status_code == 200 and usage.get_json()["data"], since
        assert assert_utc(usage.get_json()["since"], "since") == hour_ago
    past = hour_ago.astimezone(timezone(timedelta(hours=-5)))
    until = client.get("/v1/governance/audit", headers=admin, query_string={"until": past.isoformat()})
    assert until.status_code == 200 and until.get_json()["data"] == []
    report = client.get("/v1/governance/usage", headers=admin, query_string={"until": past.isoformat()})
    assert assert_utc(report.get_json()["until"], "until") == past
