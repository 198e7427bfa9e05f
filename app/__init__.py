"""flask-ai-gateway application factory."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from flask import Flask

from config import load_config


def _ensure_metrics_dir() -> None:
    """prometheus_client writes per-process sample files into PROMETHEUS_MULTIPROC_DIR as soon as
    a metric is created, which happens when app modules are imported: a missing folder used to
    kill every `flask` command with a FileNotFoundError traceback. This package's import runs
    before any of its modules', so the folder is made here, or start-up ends with one line."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(f"configuration error: PROMETHEUS_MULTIPROC_DIR: cannot create {directory}: {exc}\n")
        raise SystemExit(2) from exc


_ensure_metrics_dir()


def create_app(config: Mapping[str, object] | None = None) -> Flask:
    """Build the app: settings from the environment, overridden by `config` (tests)."""
    settings = {**load_config(), **(config or {})}
    app = Flask(__name__, instance_path=str(settings["INSTANCE_PATH"]))
    configure(app, settings)
    register_extensions(app)
    register_blueprints(app)
    register_errorhandlers(app)
    register_commands(app)
    return app


def configure(app: Flask, settings: Mapping[str, object]) -> None:
    app.config.from_mapping(settings)
    redis_url = app.config.get("REDIS_URL")
    app.config.setdefault("RATELIMIT_STORAGE_URI", redis_url or "memory://")
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"socket_timeout": 0.5, "socket_connect_timeout": 0.5})
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", app.config["RATELIMIT_FAIL_OPEN"])
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)


def register_extensions(app: Flask) -> None:
    from app import docs, health, identity, observability, tracing
    from app.extensions import api, db, jwt, limiter, metrics, migrate, redis_store
    from app.governance import audit, drift
    from app.inference import catalogue

    observability.init_app(app)
    db.init_app(app)
    tracing.init_app(app)  # before the hooks below, so the request span is open when they run
    migrate.init_app(app, db, directory=app.config["MIGRATIONS_DIR"])
    redis_store.init_app(app)
    jwt.init_app(app)
    limiter.init_app(app)
    metrics.init_app(app)
    api.init_app(app)
    api.spec.components.security_scheme(
        "bearerAuth",
        {"type": "http", "scheme": "bearer", "description": "An API key (gw-...) or a JWT access token."},
    )
    api.spec.components.security_scheme("oauth2", identity.oauth2_scheme())
    health.init_app(app)
    docs.init_app(app)
    identity.init_app(app)
    catalogue.init_app(app)
    drift.init_app(app)
    audit.init_app(app)


def register_blueprints(app: Flask) -> None:
    from app.console import bp as console
    from app.extensions import api
    from app.governance import blp as governance
    from app.health import blp as health
    from app.inference import blp as inference

    api.register_blueprint(health)
    api.register_blueprint(inference)
    api.register_blueprint(governance)
    app.register_blueprint(console)


def register_errorhandlers(app: Flask) -> None:
    from app.errors import register_errorhandlers as register

    register(app)


def register_commands(app: Flask) -> None:
    """`flask db` comes from Flask-Migrate, `flask openapi` from flask-smorest, identity's from identity."""
    from app.inference.cli import models_cli

    app.cli.add_command(models_cli)
