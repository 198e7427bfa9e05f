"""The model registry: seeding, canary split and stickiness, promote/rollback, propagation."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import select

from app.extensions import db
from app.governance.audit.models import AuditRecord
from app.identity.models import ApiKey
from tests import support

CATALOGUE = """
models:
  - name: sentiment
    backend: vader
    aliases: [mood]
"""
TENSOR = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path), "REGISTRY_POLL": "0"}


@pytest.fixture
def keys(app, database_url) -> dict[str, dict[str, str]]:
    admin = support.issue_key(database_url, "platform", ("admin",))
    user = support.issue_key(
        database_url,
        "acme",
        ("inference:invoke", "models:read", "governance:read"),
        rate_limit="100000/minute",
    )
    return {"admin": {"Authorization": f"Bearer {admin}"}, "user": {"Authorization": f"Bearer {user}"}}


def infer(client, headers, user: str | None = None, model: str = "sentiment", version: str | None = None):
    """buffered=True closes the response, as a WSGI server does, which submits its audit record."""
    body = {"inputs": [TENSOR], **({"parameters": {"user": user}} if user else {})}
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return client.post(path, json=body, headers=headers, buffered=True)


def audit_rows(app) -> dict[str, dict]:
    """Every audit record so far, by request id."""
    app.extensions["audit"].flush()
    table = AuditRecord.__table__
    with app.app_context(), db.engine.connect() as conn:
        return {row["request_id"]: dict(row) for row in conn.execute(select(table)).mappings()}


def admin(client, keys, method: str, path: str, json: dict | None = None):
    path = f"/v1/governance/models/sentiment/{path}"
    resp = client.open(path, method=method, json=json, headers=keys["admin"], buffered=True)
    assert resp.status_code < 300, resp.get_json()
    return resp


def add_canary(client, keys, weight: float = 10.0) -> None:
    resp = client.post(
        "/v1/governance/models/sentiment/versions",
        headers=keys["admin"],
        json={"version": "2", "backend": "vader"},
    )
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["status"] == "staged"
    resp = client.put(
        "/v1/governance/models/sentiment/traffic",
        headers=keys["admin"],
        json={"canary_version": "2", "canary_weight": weight},
    )
    assert resp.status_code == 200, resp.get_json()


def test_yaml_seeds_the_registry(client, keys):
    model = client.get("/v1/governance/models/mood", headers=keys["user"]).get_json()
    assert model["name"] == "sentiment" and model["active_version"] == "1" and model["aliases"] == ["mood"]
    assert [v["status"] for v in model["versions"]] == ["active"]
    resp = infer(client, keys["user"])
    assert resp.status_code == 200 and resp.headers["X-Model-Version"] == "sentiment/1"


def test_canary_splits_by_weight_and_sticks_to_each_user(app, client, keys):
    """The audit record of each call names the version that served it, canary or not."""
    add_canary(client, keys, weight=10.0)
    served = Counter()
    by_request: dict[str, str] = {}
    for i in range(2000):
        resp = infer(client, keys["user"], user=f"user-{i}")
        assert resp.status_code == 200
        served[resp.json["model_version"]] += 1
        assert resp.headers["X-Model-Version"] == f"sentiment/{resp.json['model_version']}"
        by_request[resp.headers["X-Request-ID"]] = resp.json["model_version"]
    share = served["2"] / 2000
    print(f"canary share at weight 10%: {share:.3f} of 2000 users")
    assert 0.08 <= share <= 0.12, served
    for user in ("user-1", "user-2", "user-3", "user-77"):
        versions = {infer(client, keys["user"], user=user).json["model_version"] for _ in range(10)}
        assert len(versions) == 1
    rows = audit_rows(app)
    recorded = {rid: (rows[rid]["model"], rows[rid]["model_version"]) for rid in by_request}
    assert recorded == {rid: ("sentiment", version) for rid, version in by_request.items()}


def test_promote_then_rollback(app, client, keys):
    """Every registry change is audited with the acting admin key; the retired version is no
    longer served, not even when a caller names it."""
    add_canary(client, keys, weight=50.0)
    promote = admin(client, keys, "POST", "promote")
    promoted = promote.get_json()
    assert (promoted["active_version"], promoted["previous_version"], promoted["canary_version"]) == (
        "2",
        "1",
        None,
    )
    assert {infer(client, keys["user"], user=f"u{i}").json["model_version"] for i in range(20)} == {"2"}
    rollback = admin(client, keys, "POST", "rollback")
    rolled = rollback.get_json()
    assert (rolled["active_version"], rolled["previous_version"]) == ("1", None)
    assert {infer(client, keys["user"], user=f"u{i}").json["model_version"] for i in range(20)} == {"1"}
    statuses = {v["version"]: v["status"] for v in rolled["versions"]}
    assert statuses == {"1": "active", "2": "retired"}

    assert infer(client, keys["user"], version="1").status_code == 200
    retired = infer(client, keys["user"], version="2")
    assert retired.status_code == 404 and retired.get_json()["error"]["code"] == "model_not_found"
    assert retired.get_json()["error"]["param"] == "model_version"
    metadata = client.get("/v2/models/sentiment/versions/2", headers=keys["user"])
    assert metadata.status_code == 404

    traffic = admin(client, keys, "PUT", "traffic", {"canary_version": None, "canary_weight": 0})
    disable = admin(client, keys, "POST", "disable")
    with app.app_context():
        key_id = db.session.scalar(select(ApiKey.id).where(ApiKey.name == "platform-test"))
    rows = audit_rows(app)
    actions = {
        name: rows[resp.headers["X-Request-ID"]]
        for name, resp in (
            ("promote_model_canary", promote),
            ("rollback_model", rollback),
            ("set_model_traffic", traffic),
            ("disable_model", disable),
        )
    }
    for action, row in actions.items():
        assert (row["kind"], row["action"], row["status"]) == ("admin", action, 200)
        assert row["principal"] == f"key:{key_id}"
        assert row["details"]["target"] == {"name": "sentiment"}


def test_rollback_stops_an_unpromoted_canary(client, keys):
    add_canary(client, keys, weight=50.0)
    assert {infer(client, keys["user"], user=f"u{i}").json["model_version"] for i in range(40)} == {"1", "2"}
    rolled = admin(client, keys, "POST", "rollback").get_json()
    assert (rolled["active_version"], rolled["previous_version"]) == ("1", None)
    assert (rolled["canary_version"], rolled["canary_weight"]) == (None, 0)
    assert {v["version"]: v["status"] for v in rolled["versions"]} == {"1": "active", "2": "retired"}
    assert {infer(client, keys["user"], user=f"u{i}").json["model_version"] for i in range(40)} == {"1"}
    assert infer(client, keys["user"], version="2").status_code == 404
    again = client.post("/v1/governance/models/sentiment/rollback", headers=keys["admin"])
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "no_previous"


def test_rollback_undoes_one_step_at_a_time(client, keys):
    """With a promoted version and a new canary, the first rollback stops only the canary."""
    add_canary(client, keys, weight=100.0)
    admin(client, keys, "POST", "promote")
    admin(client, keys, "POST", "versions", {"version": "3", "backend": "vader"})
    admin(client, keys, "PUT", "traffic", {"canary_version": "3", "canary_weight": 50})
    first = admin(client, keys, "POST", "rollback").get_json()
    assert (first["active_version"], first["previous_version"], first["canary_version"]) == ("2", "1", None)
    assert {infer(client, keys["user"], user=f"u{i}").json["model_version"] for i in range(40)} == {"2"}
    second = admin(client, keys, "POST", "rollback").get_json()
    assert (second["active_version"], second["previous_version"]) == ("1", None)
    assert {v["version"]: v["status"] for v in second["versions"]} == {
        "1": "active",
        "2": "retired",
        "3": "retired",
    }


def test_a_second_rollback_never_brings_back_the_retired_version(client, keys):
    """Promote 2, roll back to 1, roll back again: 409 no_previous, and 1 keeps all traffic."""
    add_canary(client, keys, weight=100.0)
    admin(client, keys, "POST", "promote")
    admin(client, keys, "POST", "rollback")
    again = client.post("/v1/governance/models/sentiment/rollback", headers=keys["admin"])
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "no_previous"
    model = client.get("/v1/governance/models/sentiment", headers=keys["user"]).get_json()
    assert (model["active_version"], model["previous_version"], model["canary_version"]) == ("1", None, None)
    assert {v["version"]: v["status"] for v in model["versions"]} == {"1": "active", "2": "retired"}
    assert {infer(client, keys["user"], user=f"u{i}").json["model_version"] for i in range(20)} == {"1"}


def test_disable_and_enable(client, keys):
    client.post("/v1/governance/models/sentiment/disable", headers=keys["admin"])
    resp = infer(client, keys["user"])
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "model_disabled"
    assert "sentiment" not in {m["id"] for m in client.get("/v1/models", headers=keys["user"]).json["data"]}
    client.post("/v1/governance/models/sentiment/enable", headers=keys["admin"])
    assert infer(client, keys["user"]).status_code == 200


def test_registry_changes_need_admin(client, keys):
    for method, path, body in [
        ("POST", "/v1/governance/models", {"name": "x"}),
        ("POST", "/v1/governance/models/sentiment/versions", {"version": "9", "backend": "vader"}),
        ("PUT", "/v1/governance/models/sentiment/traffic", {"canary_version": None, "canary_weight": 0}),
        ("POST", "/v1/governance/models/sentiment/promote", None),
        ("POST", "/v1/governance/models/sentiment/rollback", None),
        ("POST", "/v1/governance/models/sentiment/disable", None),
        ("POST", "/v1/governance/models/sentiment/enable", None),
    ]:
        resp = client.open(path, method=method, json=body, headers=keys["user"])
        assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "insufficient_scope"


def test_registry_errors(client, keys):
    admin = keys["admin"]
    assert client.post("/v1/governance/models/sentiment/rollback", headers=admin).get_json()["error"][
        "code"
    ] == ("no_previous")
    assert client.post("/v1/governance/models/sentiment/promote", headers=admin).status_code == 409
    resp = client.put(
        "/v1/governance/models/sentiment/traffic",
        headers=admin,
        json={"canary_version": "7", "canary_weight": 5},
    )
    assert resp.status_code == 404 and resp.get_json()["error"]["param"] == "version"
    resp = client.post(
        "/v1/governance/models/sentiment/versions", headers=admin, json={"version": "1", "backend": "vader"}
    )
    assert resp.status_code == 409
    resp = client.post("/v1/governance/models", headers=admin, json={"name": "other", "aliases": ["mood"]})
    assert resp.status_code == 409 and resp.get_json()["error"]["param"] == "aliases"
    assert client.get("/v1/governance/models/nope", headers=admin).status_code == 404


@pytest.mark.server
def test_rollback_reaches_every_instance_within_two_seconds(sqlite_template, redis_url, tmp_path):
    """Promoted and rolled back through one instance; the other serves each change within 2 s
    (REGISTRY_POLL is 1 s). Two instances, each driven explicitly, stand for any two workers."""
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text(CATALOGUE)
    db_url = support.copy_sqlite(sqlite_template, tmp_path / "gw.db")
    admin = {"Authorization": f"Bearer {support.issue_key(db_url, 'platform', ('admin',))}"}
    user = {"Authorization": f"Bearer {support.issue_key(db_url, 'acme')}"}
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(catalogue),
        "MODELS_DIR": str(tmp_path),
    }
    with (
        support.GunicornServer(env, workers=1, ready_path="/readyz") as first,
        support.GunicornServer(env, workers=1, ready_path="/readyz") as second,
    ):

        def versions(server: support.GunicornServer, n: int = 30) -> set[str]:
            def one(i: int) -> str:
                with requests.Session() as s:
                    resp = s.post(
                        server.url + "/v2/models/sentiment/infer",
                        headers={**user, "Connection": "close"},
                        json={"inputs": [TENSOR], "parameters": {"user": f"u{i}"}},
                        timeout=10,
                    )
                    return resp.headers["X-Model-Version"]

            with ThreadPoolExecutor(12) as pool:
                return set(pool.map(one, range(n)))

        base = first.url + "/v1/governance/models/sentiment"
        assert (
            requests.post(
                base + "/versions", json={"version": "2", "backend": "vader"}, headers=admin, timeout=10
            ).status_code
            == 201
        )
        requests.put(
            base + "/traffic", json={"canary_version": "2", "canary_weight": 100}, headers=admin, timeout=10
        )
        requests.post(base + "/promote", headers=admin, timeout=10)
        time.sleep(2.0)
        assert versions(first) == versions(second) == {"sentiment/2"}
        rolled_at = time.monotonic()
        assert requests.post(base + "/rollback", headers=admin, timeout=10).status_code == 200
        time.sleep(max(0.0, rolled_at + 2.0 - time.monotonic()))
        assert versions(second) == {"sentiment/1"}, "the other instance still served the rolled-back version"
        assert versions(first) == {"sentiment/1"}


def test_a_version_whose_backend_params_cannot_work_is_refused_and_not_stored(client, keys):
    """The fuzzer's registration: model "0", an openai_compatible version without base_url. Each
    backend's own schema decides, before anything is stored; the error names the field."""
    admin = keys["admin"]
    assert client.post("/v1/governance/models", headers=admin, json={"name": "0"}).status_code == 201
    refused = {
        "params.base_url": ("openai_compatible", {}),
        "params.deadline_s": ("openai_compatible", {"base_url": "http://127.0.0.1:9/v1", "deadline_s": 0}),
        "params.encoding_format": (
            "openai_compatible",
            {"base_url": "http://h:1/v1", "encoding_format": "x"},
        ),
        "params.artifact": ("sklearn", {}),
        "params.n_ctx": ("llama_cpp", {"n_ctx": "many"}),
        "params.colour": ("vader", {"colour": "blue"}),  # a family without params refuses any
    }
    for param, (backend, params) in refused.items():
        resp = client.post(
            "/v1/governance/models/0/versions",
            headers=admin,
            json={"version": "1", "backend": backend, "params": params},
        )
        body = resp.get_json()
        assert resp.status_code == 400, (param, body)
        assert (body["error"]["code"], body["error"]["param"]) == ("invalid_backend_params", param)
        assert body["error"]["message"].startswith(f"{param}: ")
    assert client.get("/v1/governance/models/0", headers=admin).get_json()["versions"] == []
    ok = client.post(
        "/v1/governance/models/0/versions",
        headers=admin,
        json={
            "version": "1",
            "backend": "openai_compatible",
            "params": {"base_url": "http://127.0.0.1:9/v1"},
        },
    )
    assert ok.status_code == 201, ok.get_json()
    assert client.get("/readyz").status_code == 200


def test_aliases_are_well_formed_and_unique(client, keys):
    """Malformed is a validation error like a malformed name (422); taken is 409, as for names."""
    admin = keys["admin"]

    def register(body: dict):
        return client.post("/v1/governance/models", headers=admin, json=body)

    for aliases, param in (([""], "aliases.0"), (["ok", "a b"], "aliases.1"), (["d", "d"], "aliases")):
        resp = register({"name": "fresh", "aliases": aliases})
        assert resp.status_code == 422 and resp.get_json()["error"]["param"] == param, resp.get_json()
    for body, param in (
        ({"name": "mood"}, "name"),  # another model's alias
        ({"name": "fresh", "aliases": ["sentiment"]}, "aliases"),  # another model's name
        ({"name": "fresh", "aliases": ["fresh"]}, "aliases"),  # its own name
    ):
        resp = register(body)
        assert resp.status_code == 409 and resp.get_json()["error"]["param"] == param, resp.get_json()
    names = {m["name"] for m in client.get("/v1/governance/models", headers=admin).get_json()["data"]}
    assert names == {"sentiment"}


def test_a_model_that_fails_to_load_is_fatal_only_if_required(client, keys, tmp_path):
    """A real load failure (a pinned artifact that is not a skops file) is reported per model in
    /readyz; the instance stays ready unless the model was registered as required."""
    admin = keys["admin"]
    artifact = tmp_path / "broken.skops"
    artifact.write_bytes(b"this is not a zip archive")
    version = {
        "version": "1",
        "backend": "sklearn",
        "artifact_uri": str(artifact),
        "artifact_sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
    }

    def readyz() -> tuple[int, dict]:
        resp = client.get("/readyz")
        body = resp.get_json()
        return resp.status_code, next(c for c in body["checks"] if c["name"] == "models") | {
            "not_ready": body["not_ready"]
        }

    for name, required in (("extra", None), ("vital", True)):
        body = {"name": name} | ({"required": required} if required is not None else {})
        resp = client.post("/v1/governance/models", headers=admin, json=body)
        assert resp.status_code == 201 and resp.get_json()["required"] is bool(required)
        assert (
            client.post(f"/v1/governance/models/{name}/versions", headers=admin, json=version).status_code
            == 201
        )
        if name == "extra":
            status, models = readyz()
            assert status == 200 and models["ready"] is True and models["not_ready"] == [], models
            assert "extra/1: failed (" in models["detail"] and "[not required]" in models["detail"]
            assert "sentiment/1: loaded" in models["detail"]
            assert client.get("/v2/health/ready").status_code == 200
            served = infer(client, keys["user"], model="extra")
            assert served.status_code == 503 and served.get_json()["error"]["code"] == "model_not_ready"
    status, models = readyz()
    assert status == 503 and models["not_ready"] == ["models"], models
    assert "vital/1: failed (" in models["detail"]
    assert client.get("/v2/health/ready").status_code == 503
    assert infer(client, keys["user"]).status_code == 200  # the other models still serve


def test_catalogue_models_are_required(client, keys):
    model = client.get("/v1/governance/models/sentiment", headers=keys["user"]).get_json()
    assert model["required"] is True
