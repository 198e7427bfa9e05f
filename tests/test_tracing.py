"""OpenTelemetry: the span tree of one governed request, `traceparent` at the upstream, trace ids
in the log lines, and tracing off by default (an in-memory exporter stands in for OTLP)."""

from __future__ import annotations

import pytest
import structlog.testing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.upstream_sim import run_simulator
from config import ConfigError, load_config

CATALOGUE = """
models:
  - name: upstream-chat
    backend: openai_compatible
    params:
      base_url: {base_url}
      model: sim-model
      deadline_s: 10
  - name: sentiment
    backend: vader
"""
STEPS = {"gateway.auth", "gateway.rate_limit", "gateway.policy", "gateway.quota", "gateway.backend"}


@pytest.fixture(scope="module")
def simulator():
    with run_simulator(latency_ms=0) as sim:
        yield sim


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced_app(database_url, redis_url, simulator, exporter, tmp_path, monkeypatch):
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE.format(base_url=simulator.base_url))
    for key, value in {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(path),
        "MODELS_DIR": str(tmp_path),
        "REGISTRY_POLL": "0",
        "INSTANCE_PATH": str(tmp_path / "instance"),
    }.items():
        monkeypatch.setenv(key, value)
    from app import create_app
    from app.governance import audit

    application = create_app({"OTEL_SPAN_EXPORTER": exporter})
    yield application
    audit.shutdown(application)
    application.extensions["usage_ledger"].close()


def _status(span) -> int:
    """The response status, under the old or the new HTTP semantic-convention name."""
    return span.attributes.get("http.response.status_code", span.attributes.get("http.status_code"))


def _key(app) -> str:
    from app.identity import accounts, apikeys
    from app.identity import scopes as sc

    with app.app_context():
        tenant = accounts.create_tenant("acme")
        _, key = apikeys.issue_key(tenant, "acme", [sc.INFERENCE_INVOKE, sc.MODELS_READ])
    return key


def test_one_chat_request_is_one_span_tree(traced_app, exporter, simulator):
    key = _key(traced_app)
    exporter.clear()
    simulator.reset()
    with structlog.testing.capture_logs() as logged:
        resp = traced_app.test_client().post(
            "/v1/chat/completions",
            json={"model": "upstream-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status_code == 200, resp.get_json()
        resp.close()  # the access line is written when the response is closed, as a server does
    traced_app.extensions["tracer_provider"].force_flush()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    root = roots[0]
    assert root.name == "POST /v1/chat/completions" and _status(root) == 200
    trace_id = root.context.trace_id
    assert {s.context.trace_id for s in spans} == {trace_id}, "every span belongs to the request's trace"
    by_name = {s.name: s for s in spans}
    assert set(by_name) >= STEPS, sorted(by_name)
    # The steps are children of the request span, in the order the request path runs them.
    for name in STEPS | {"gateway.audit"} & set(by_name):
        assert by_name[name].parent.span_id == root.context.span_id, name
    order = sorted(STEPS, key=lambda n: by_name[n].start_time)
    assert order == [
        "gateway.auth",
        "gateway.rate_limit",
        "gateway.policy",
        "gateway.quota",
        "gateway.backend",
    ]
    # Database and Redis calls show up below the request too (official instrumentations).
    assert any(s.attributes.get("db.system") in {"sqlite", "postgresql"} for s in spans)

    # W3C traceparent reached the simulator, naming this trace and the backend span as parent.
    (traceparent,) = simulator.stats()["traceparents"]
    version, tid, parent, _flags = traceparent.split("-")
    assert version == "00" and int(tid, 16) == trace_id
    assert int(parent, 16) == by_name["gateway.backend"].context.span_id

    # The access log line carries the trace id.
    (access,) = [x for x in logged if x["event"] == "request" and x["path"] == "/v1/chat/completions"]
    assert access["trace_id"] == format(trace_id, "032x")


def test_a_refused_request_is_traced_with_its_status(traced_app, exporter):
    exporter.clear()
    resp = traced_app.test_client().post(
        "/v1/chat/completions", json={}, headers={"Authorization": "Bearer gw-nope_nope"}
    )
    assert resp.status_code == 401
    traced_app.extensions["tracer_provider"].force_flush()
    (root,) = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert _status(root) == 401


def test_tracing_is_off_by_default_and_follows_otel_variables():
    assert load_config({})["TRACING_ENABLED"] is False
    assert load_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})["TRACING_ENABLED"] is True
    assert load_config({"OTEL_TRACES_EXPORTER": "console"})["OTEL_TRACES_EXPORTER"] == "console"
    on_but_disabled = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}
    assert load_config(on_but_disabled)["TRACING_ENABLED"] is False
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        load_config({"OTEL_TRACES_EXPORTER": "jaeger"})


def test_no_tracer_when_off(app):
    assert "tracer" not in app.extensions
