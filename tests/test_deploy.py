"""deploy/: no container engine runs here, so the compose file, the Prometheus and collector
configs and the Grafana dashboard are kept honest by reading them against the code: the metric
names the dashboard queries against what /metrics exports, and every compose service's command,
environment and ports against the settings the app reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from config import load_config
from tests.support import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "flask-ai-gateway.json"
GATEWAYS = ("gateway-1", "gateway-2")
# Read by libraries or the image rather than by config/: Prometheus multiprocess, HF offline, the
# flask CLI's app, and every OTEL_* variable (the OpenTelemetry SDK reads them itself).
LIBRARY_SETTINGS = {"PROMETHEUS_MULTIPROC_DIR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "FLASK_APP"}


def _exported_families(tmp_path) -> set[str]:
    """Metric families in /metrics of a fresh app (counters without _total). Without
    PROMETHEUS_MULTIPROC_DIR the registry lists every declared family, sampled yet or not
    (multiprocess mode lists only sampled ones)."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text("models:\n  - name: sentiment\n    backend: vader\n")
    env |= {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'm.db'}",
        "INSTANCE_PATH": str(tmp_path),
        "MODELS_CONFIG": str(catalogue),
        "MODELS_DIR": str(tmp_path),
    }
    code = (
        "from app import create_app\nprint(create_app().test_client().get('/metrics').get_data(as_text=True))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    return {re.sub(r"_total$", "", name) for name in re.findall(r"^# TYPE (\w+) ", proc.stdout, re.M)}


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs, "the dashboard has no queries"
    names = set()
    for expr in exprs:
        for name in re.findall(r"\b((?:gateway|flask)_[a-z_]+)\b", expr):
            names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    return names


def test_dashboard_queries_only_metrics_we_export(tmp_path):
    exported = _exported_families(tmp_path)
    assert "gateway_http_requests_in_flight" in exported, sorted(exported)
    # Counters are compared without their _total suffix, on both sides.
    wanted = {re.sub(r"_total$", "", name) for name in _dashboard_metrics()}
    missing = wanted - exported
    assert not missing, f"the dashboard queries metrics /metrics does not export: {sorted(missing)}"
    # And it covers what an operator watches: requests, latency, in-flight, model queue, tokens,
    # errors, drift, audit.
    for family in (
        "flask_http_request_duration_seconds",
        "gateway_http_requests_in_flight",
        "gateway_model_queue_depth",
        "gateway_model_tokens",
        "gateway_model_errors",
        "gateway_model_drifted",
        "gateway_audit_buffer_depth",
    ):
        assert family in wanted, family


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _known_settings() -> set[str]:
    """Every upper-case name the settings code mentions as a string: a superset of what it reads,
    enough to catch a misspelt variable (REDIS_URI) that the app would silently ignore."""
    names: set[str] = set()
    for path in (ROOT / "config" / "__init__.py", ROOT / "gunicorn.conf.py"):
        names |= set(re.findall(r"\"([A-Z][A-Z0-9_]+)\"", path.read_text()))
    return names


def _resolved(environment: dict[str, str]) -> dict[str, str]:
    """Compose's ${VAR:?message} is a required variable: give it a value as an operator must."""
    secret = "s" * 48
    return {k: re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", secret, str(v)) for k, v in environment.items()}


@pytest.mark.parametrize("name", [*GATEWAYS, "migrate", "worker"])
def test_gateway_services_use_only_settings_the_app_reads(name):
    service = _compose()["services"][name]
    env = _resolved(service["environment"])
    unknown = {k for k in env if k not in _known_settings() | LIBRARY_SETTINGS and not k.startswith("OTEL_")}
    assert not unknown, f"{name} sets variables nothing reads: {sorted(unknown)}"
    cfg = load_config(env)  # raises ConfigError on any bad value, as the container would at start
    assert cfg["SQLALCHEMY_DATABASE_URI"].startswith("postgresql+psycopg://gateway:gateway@postgres:5432/")
    assert cfg["REDIS_URL"] == "redis://redis:6379/0"
    if name != "migrate":
        assert cfg["TRACING_ENABLED"] is True and cfg["OTEL_TRACES_EXPORTER"] == "otlp"


def test_compose_wiring_matches_the_services():
    compose = _compose()
    services = compose["services"]
    expected = {
        *GATEWAYS,
        "migrate",
        "worker",
        "postgres",
        "redis",
        "prometheus",
        "grafana",
        "otel-collector",
    }
    assert expected <= set(services)
    postgres = services["postgres"]["environment"]
    host_ports = []
    for name in GATEWAYS:
        gateway = services[name]
        bind_port = gateway["environment"]["BIND"].rsplit(":", 1)[1]
        (mapping,) = gateway["ports"]
        host, container = mapping.split(":")
        assert container == bind_port, f"{name} publishes {container} but gunicorn binds {bind_port}"
        host_ports.append(host)
        command = " ".join(gateway["command"])
        assert "gunicorn -c gunicorn.conf.py" in command and "db upgrade" not in command
        assert gateway["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        user, password, db = "gateway", "gateway", "gateway"
        assert gateway["environment"]["DATABASE_URL"] == f"postgresql://{user}:{password}@postgres:5432/{db}"
        assert (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]) == (
            user,
            password,
            db,
        )
        assert int(gateway["environment"]["WEB_CONCURRENCY"]) > 1  # hence REDIS_URL, as config requires
    assert len(set(host_ports)) == len(host_ports), "two instances on one host need two host ports"
    assert services["migrate"]["command"] == ["flask", "db", "upgrade"]
    assert "pgvector" in services["postgres"]["image"]

    # Prometheus scrapes every instance on the port gunicorn binds.
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{name}:8000" for name in GATEWAYS}

    # The collector listens where the gateways send OTLP/HTTP.
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    endpoint = services["gateway-1"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == "http://otel-collector:4318"
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]

    # Grafana is provisioned with the Prometheus datasource the dashboard names, and the folder
    # it mounts holds the dashboard.
    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert DASHBOARD.parent == DEPLOY / "grafana" / "dashboards" and "./grafana/dashboards" in mounts
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/gateway.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./grafana/dashboards"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {uid}
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_the_worker_service_runs_the_batch_worker_on_the_gateways_stores():
    """The compose `worker` runs the module `make worker` runs, on the same database and queue."""
    services = _compose()["services"]
    worker = services["worker"]
    command = worker["command"]
    assert command[:2] == ["python", "-m"] and (ROOT / (command[2].replace(".", "/") + ".py")).is_file()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^worker:.*\n\t\$\(PY\) -m {re.escape(command[2])}$", makefile, re.M), "make worker"
    for key in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY"):
        assert worker["environment"][key] == services["gateway-1"]["environment"][key], key
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert load_config(_resolved(worker["environment"]))["BATCH_WORKER_CONCURRENCY"] == 2
