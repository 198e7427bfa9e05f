"""Drift monitoring: live inputs per model version against a reference profile (PSI, KS, centroids).

The request path calls `observe_tabular` or `observe_texts` after a successful model call; both only
append to a rolling window (see window.py), never touch the database, and never raise.
`GET /v1/governance/models/<name>/drift` and the `gateway_model_drift_*` gauges give the verdicts.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import structlog
from flask import Flask

from app.governance.drift import routes  # noqa: F401  (registers the route on the governance blueprint)
from app.governance.drift.monitor import DriftMonitor, DriftSettings, monitor

__all__ = ["DriftMonitor", "DriftSettings", "init_app", "monitor", "observe_tabular", "observe_texts"]

log = structlog.get_logger(__name__)
_last_failure = float("-inf")


def init_app(app: Flask) -> None:
    """Create the app's monitor; each worker starts its periodic refresh on its first request."""
    if "drift" in app.extensions:
        return
    drift = DriftMonitor(DriftSettings.from_config(app.config), app.extensions.get("redis_client"))
    app.extensions["drift"] = drift
    if drift.settings.interval_s > 0:
        app.before_request(partial(drift.start, app))


def observe_tabular(tenant_id: str, model: str, version: str, rows: np.ndarray) -> None:
    """Record the feature rows (n_rows x n_features) a tenant just sent a tabular model version."""
    try:
        monitor().observe_rows(tenant_id, model, version, rows)
    except Exception as exc:
        _failed(exc, model)


def observe_texts(
    tenant_id: str, model: str, version: str, texts: list[str], embeddings: np.ndarray | None
) -> None:
    """Record a tenant's text inputs (chat prompt text, embeddings inputs) and their embeddings."""
    try:
        monitor().observe_texts(tenant_id, model, version, texts, embeddings)
    except Exception as exc:
        _failed(exc, model)


def _failed(exc: Exception, model: str) -> None:
    """Monitoring must never fail the inference it watches; a bug here shows in the log, once a minute."""
    global _last_failure
    now = time.monotonic()
    if now - _last_failure >= 60:
        _last_failure = now
        log.error("drift_observe_failed", model=model, error=f"{type(exc).__name__}: {exc}")
