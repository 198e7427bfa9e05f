"""App factory, configuration, docs, health, database and CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from openapi_spec_validator import validate
from sqlalchemy import inspect, text

from config import ConfigError, derived_pepper, load_config
from tests.support import ROOT


def test_healthz_touches_nothing(monkeypatch):
    """Liveness with every dependency unreachable: only readiness may depend on them."""
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    from app import create_app

    resp = create_app().test_client().get("/healthz")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_readyz_ready_on_both_engines(any_database_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", any_database_url)
    from app import create_app

    app = create_app()
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 200, resp.get_json()
    checks = {c["name"]: c for c in resp.get_json()["checks"]}
    assert checks["database"]["ready"]


def test_readyz_503_lists_what_is_not_ready(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    from app import create_app

    resp = create_app().test_client().get("/readyz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "not_ready" and "database" in body["not_ready"]
    assert "Traceback" not in resp.get_data(as_text=True)


def test_readyz_checks_redis_when_configured(monkeypatch, redis_url):
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    from app import create_app

    resp = create_app().test_client().get("/readyz")
    assert resp.status_code == 503 and "redis" in resp.get_json()["not_ready"]
    monkeypatch.setenv("REDIS_URL", redis_url)
    resp = create_app().test_client().get("/readyz")
    checks = {c["name"]: c for c in resp.get_json()["checks"]}
    assert checks["redis"] == {"name": "redis", "ready": True, "detail": "ok"}


def test_openapi_spec_is_valid_and_declares_bearer(client):
    spec = client.get("/openapi.json").get_json()
    validate(spec)
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_swagger_and_redoc_are_served(client):
    for path in ("/docs", "/redoc"):
        resp = client.get(path)
        assert resp.status_code == 200 and b"<html" in resp.data.lower()


def test_flask_openapi_write(runner, tmp_path):
    out = tmp_path / "spec.json"
    result = runner.invoke(args=["openapi", "write", str(out)])
    assert result.exit_code == 0, result.output
    validate(__import__("json").loads(out.read_text()))


def test_migrations_reach_head_on_both_engines(any_database_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", any_database_url)
    from app import create_app
    from app.extensions import db

    app = create_app()
    with app.app_context():
        tables = set(inspect(db.engine).get_table_names())
        assert {"alembic_version", "tenants", "users", "api_keys"} <= tables
        version = db.session.execute(text("SELECT version_num FROM alembic_version")).scalar()
        assert version
        db.session.remove()
        db.engine.dispose()


def test_database_roundtrip_on_both_engines(any_database_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", any_database_url)
    from app import create_app
    from app.extensions import db
    from app.identity.models import Tenant

    app = create_app()
    with app.app_context():
        db.session.add(Tenant(name="acme"))
        db.session.commit()
        assert db.session.execute(db.select(Tenant.name)).scalar_one() == "acme"
        db.session.remove()
        db.engine.dispose()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"APP_ENV": "production"}, "SECRET_KEY"),
        ({"APP_ENV": "production", "SECRET_KEY": "s" * 40}, "JWT_SECRET_KEY"),
        (
            {"APP_ENV": "production", "SECRET_KEY": "dev-insecure-change-me", "JWT_SECRET_KEY": "j" * 40},
            "SECRET_KEY",
        ),
        ({"DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgresql:///"}, "DATABASE_URL"),
        ({"WEB_CONCURRENCY": "2"}, "REDIS_URL"),
        ({"WEB_CONCURRENCY": "two"}, "WEB_CONCURRENCY"),
        ({"APP_ENV": "staging"}, "APP_ENV"),
        ({"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        (
            {
                "APP_ENV": "production",
                "SECRET_KEY": "s" * 40,
                "JWT_SECRET_KEY": "j" * 40,
                "API_KEY_PEPPER": "short",
            },
            "API_KEY_PEPPER",
        ),
        ({"MAX_IN_FLIGHT": "0"}, "MAX_IN_FLIGHT"),
        ({"MAX_PENDING": "-1"}, "MAX_PENDING"),
        ({"MAX_PENDING_WAIT": "-1"}, "MAX_PENDING_WAIT"),
    ],
)
def test_bad_configuration_names_the_variable(env, variable):
    with pytest.raises(ConfigError) as info:
        load_config(env)
    assert str(info.value).startswith(f"{variable}:")


def test_production_accepts_real_secrets():
    cfg = load_config({"APP_ENV": "production", "SECRET_KEY": "s" * 40, "JWT_SECRET_KEY": "j" * 40})
    assert cfg["ENV_NAME"] == "production" and cfg["BOOTSTRAP"] is False
    # Without API_KEY_PEPPER the pepper comes from SECRET_KEY: no new variable to deploy.
    assert cfg["API_KEY_PEPPER"] == derived_pepper("s" * 40) != "s" * 40


def test_bad_configuration_fails_fast_with_one_line():
    env = {"PATH": "/usr/bin:/bin", "APP_ENV": "production", "HOME": "/tmp"}
    proc = subprocess.run(
        [sys.executable, "-c", "import wsgi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["configuration error: SECRET_KEY: required in production"]


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"TIMEOUT": "soon"}, "configuration error: TIMEOUT: must be a whole number >= 0, got 'soon'"),
        (
            {"WEB_CONCURRENCY": "0"},
            "configuration error: WEB_CONCURRENCY: must be a whole number >= 1, got '0'",
        ),
        ({"APP_ENV": "production"}, "configuration error: SECRET_KEY: required in production"),
    ],
)
def test_gunicorn_fails_fast_with_one_line(env, line, tmp_path):
    """Bad gunicorn knobs (read by gunicorn.conf.py) and bad app settings (on_starting) alike."""
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in proc.stderr


def test_flask_cli_fails_fast_with_one_line():
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "DATABASE_URL": "oracle://db/x"}
    flask = str(ROOT / ".venv" / "bin" / "flask") if (ROOT / ".venv").exists() else "flask"
    proc = subprocess.run(
        [flask, "--app", "wsgi", "db", "current"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("configuration error: DATABASE_URL:")
    assert "Traceback" not in proc.stderr


def test_flask_cli_creates_a_missing_metrics_directory(tmp_path):
    """A PROMETHEUS_MULTIPROC_DIR that does not exist yet used to kill every `flask` command
    (`flask db upgrade` included) with a FileNotFoundError traceback."""
    missing = tmp_path / "not" / "yet"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}",
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "PROMETHEUS_MULTIPROC_DIR": str(missing),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert missing.is_dir() and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", [["-m", "flask", "--app", "wsgi", "db", "current"], ["-m", "gunicorn"]])
def test_an_uncreatable_metrics_directory_fails_with_one_line(command, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PROMETHEUS_MULTIPROC_DIR": str(blocker / "prom")}
    if command[1] == "gunicorn":
        command = [*command, "-c", str(ROOT / "gunicorn.conf.py")]
        env["BIND"] = "127.0.0.1:0"
    proc = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"configuration error: PROMETHEUS_MULTIPROC_DIR: cannot create {blocker / 'prom'}")
    assert "Traceback" not in proc.stderr


def test_make_migrate_on_a_fresh_instance(tmp_path):
    """`make run`'s first step, in the environment make gives it (no metrics directory yet)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PROMETHEUS_MULTIPROC_DIR", "APP_ENV", "DATABASE_URL"}
    }
    env["INSTANCE_PATH"] = str(tmp_path)
    proc = subprocess.run(
        ["make", "-s", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "gateway.db").exists()
