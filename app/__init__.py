"""flask-ai-gateway application factory."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from flask import Flask

from app.extension import FlaskAIGateway
from config import load_config

__all__ = ["FlaskAIGateway", "create_app"]


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
    """The gateway as its own service: settings from the environment, overridden by `config`
    (tests), on a fresh app that the gateway owns entirely (errors and logging included)."""
    settings = {**load_config(), **(config or {})}
    app = Flask(__name__, instance_path=str(settings["INSTANCE_PATH"]))
    FlaskAIGateway(app, config=settings, error_handlers="app", configure_logging=True)
    return app
