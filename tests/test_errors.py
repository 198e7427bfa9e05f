"""Bad input gets our one error shape, the right status, the request id, and no traceback."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from app.api import GatewayBlueprint


def assert_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error", "request_id"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["request_id"] and resp.headers["X-Request-ID"] == body["request_id"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    assert "Traceback" not in resp.get_data(as_text=True)
    return body


@pytest.fixture
def app(app: Flask) -> Flask:
    """Adds a validated echo route and a crashing route to the real app."""
    import marshmallow as ma

    blp = GatewayBlueprint("testing_routes", __name__)

    class Item(ma.Schema):
        name = ma.fields.String(required=True, validate=ma.validate.Length(min=1))
        count = ma.fields.Integer(required=True)

    class Order(ma.Schema):
        items = ma.fields.List(ma.fields.Nested(Item), required=True)

    @blp.route("/_test/echo", methods=["POST"])
    @blp.arguments(Order)
    def echo(body):
        return body

    @blp.route("/_test/crash")
    def crash():
        raise RuntimeError("secret internal detail")

    @blp.route("/_test/database-down")
    def database_down():
        from sqlalchemy.exc import OperationalError

        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    @blp.route("/_test/redis-down")
    def redis_down():
        from redis.exceptions import ConnectionError as RedisConnectionError

        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    from app.extensions import api

    api.register_blueprint(blp)
    return app


def test_malformed_json_is_400(client):
    resp = client.post("/_test/echo", data="{not json", content_type="application/json")
    assert_error(resp, 400, "invalid_json")


def test_unknown_route_is_404(client):
    assert_error(client.get("/no/such/route"), 404, "not_found")


def test_wrong_method_is_405(client):
    resp = client.delete("/healthz")
    assert_error(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


def test_oversized_body_is_413(client, app):
    big = b'{"items": "' + b"x" * (app.config["MAX_CONTENT_LENGTH"] + 10) + b'"}'
    assert_error(
        client.post("/_test/echo", data=big, content_type="application/json"), 413, "request_too_large"
    )


def test_wrong_content_type_is_415(client):
    resp = client.post("/_test/echo", data="items=1", content_type="application/x-www-form-urlencoded")
    assert_error(resp, 415, "unsupported_media_type")


def test_schema_violation_is_422_naming_the_field(client):
    resp = client.post("/_test/echo", json={"items": [{"name": "a", "count": 1}, {"name": "", "count": "x"}]})
    body = assert_error(resp, 422, "validation_error")
    params = {d["param"] for d in body["error"]["details"]}
    assert params == {"items.1.name", "items.1.count"}
    assert body["error"]["param"] in params
    assert body["error"]["message"].startswith(body["error"]["param"])


def test_missing_field_is_422(client):
    assert_error(client.post("/_test/echo", json={}), 422, "validation_error", param="items")


def test_internal_error_is_500_without_traceback(client):
    resp = client.get("/_test/crash")
    body = assert_error(resp, 500, "internal_error")
    assert "secret internal detail" not in resp.get_data(as_text=True)
    assert body["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    ("path", "code"), [("database-down", "database_unavailable"), ("redis-down", "redis_unavailable")]
)
def test_a_store_that_is_down_is_503_with_retry_after_not_500(client, path, code):
    """An outage of the database or Redis is the client's cue to retry, not a bug of ours."""
    resp = client.get(f"/_test/{path}")
    body = assert_error(resp, 503, code)
    assert resp.headers["Retry-After"] == "1"
    assert "connection refused" not in resp.get_data(as_text=True).lower()
    assert body["error"]["type"] == "service_unavailable"


def test_request_id_is_echoed_when_sane_and_replaced_when_not(client):
    resp = client.get("/healthz", headers={"X-Request-ID": "abc-123.DEF:4"})
    assert resp.headers["X-Request-ID"] == "abc-123.DEF:4"
    resp = client.get("/nope", headers={"X-Request-ID": "bad id <script>"})
    body = assert_error(resp, 404)
    assert body["request_id"] != "bad id <script>" and len(body["request_id"]) == 32
    resp = client.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert len(resp.headers["X-Request-ID"]) == 32


def test_spec_documents_error_shape_as_default_response(client):
    spec = client.get("/openapi.json").get_json()
    default = spec["paths"]["/readyz"]["get"]["responses"]["default"]
    name = default["$ref"].rsplit("/", 1)[1]
    schema_ref = spec["components"]["responses"][name]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert set(schema["required"]) == {"error", "request_id"}


def test_oversized_body_is_a_json_413_on_every_route(app, client):
    """Every route that takes a body, authenticated, so the request reaches the audit hooks: a 2 MB
    body used to turn into a 500 HTML page on chat and embeddings, because the audit after-request
    hook read the refused body again."""
    from tests.test_identity import bearer, seed

    world = seed(app)
    big = b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    routes = [
        (rule, method)
        for rule in app.url_map.iter_rules()
        for method in sorted(rule.methods & {"POST", "PUT", "PATCH"})
        if not rule.rule.startswith("/_test")
    ]
    assert any(rule.rule == "/v1/chat/completions" for rule, _ in routes)
    for rule, method in routes:
        path = re.sub(r"<[^>]+>", "x", rule.rule)
        resp = client.open(
            path, method=method, data=big, content_type="application/json", headers=bearer(world.admin_key)
        )
        if path in ("/v1/auth/refresh", "/v1/auth/revoke"):
            # These take a JWT, so an API key is refused on the credential before the body is read.
            assert resp.status_code in (400, 401)
            assert_error(resp, resp.status_code)
            continue
        if rule.arguments and resp.status_code == 404:
            assert_error(resp, 404)  # the resource "x" is looked up before its body is read
            continue
        assert_error(resp, 413, "request_too_large")
