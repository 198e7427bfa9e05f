"""Unbound extension instances; `create_app` binds each with `init_app`.

Nothing here touches the network at import time, so this module is safe to import before
gevent has patched the process (it never is: gunicorn patches before loading the app).
"""

from __future__ import annotations

import os
from datetime import datetime

import structlog
from flask import Flask, current_app
from flask_jwt_extended import JWTManager
from flask_limiter import Limiter
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics
from redis import Redis
from sqlalchemy.orm import DeclarativeBase, registry

from app.api import GatewayApi
from app.timestamps import UTCDateTime


class Base(DeclarativeBase):
    """Declarative base shared by every model, so Alembic sees one metadata.

    Every datetime column is timezone-aware UTC in Python (see app/timestamps.py).
    """

    registry = registry(type_annotation_map={datetime: UTCDateTime})


class RedisClient:
    """One shared, pooled Redis client per app, or None when REDIS_URL is unset."""

    def init_app(self, app: Flask) -> None:
        url = app.config.get("REDIS_URL")
        client = None
        if url:
            client = Redis.from_url(
                url,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                health_check_interval=30,
                decode_responses=True,
            )
        else:
            structlog.get_logger(__name__).warning(
                "redis_not_configured",
                detail="REDIS_URL is unset: rate limits, quotas, revocations and drift windows are "
                "per process, exact only with one worker",
            )
        app.extensions["redis_client"] = client

    @property
    def client(self) -> Redis | None:
        return current_app.extensions.get("redis_client")


# Collectors that read their values when /metrics is scraped (batch progress, from the database):
# what they report is shared state no single process counts, so no sample file can hold it.
scrape_collectors: list[Collector] = []


class _MultiprocessMetrics(GunicornInternalPrometheusMetrics):
    def generate_metrics(self, accept_header: str | None = None, names: list[str] | None = None):
        """The library's multiprocess scrape (a fresh registry over the sample files, per scrape),
        plus `scrape_collectors`, which it has no way to take."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        for collector in scrape_collectors:
            registry.register(collector)
        if names:
            registry = registry.restricted_registry(names)
        encoder, content_type = choose_encoder(accept_header)
        return encoder(registry).decode("utf-8"), content_type


def _metrics_class() -> type[PrometheusMetrics]:
    # Under gunicorn every worker writes its samples to PROMETHEUS_MULTIPROC_DIR and /metrics
    # aggregates them; a single process (python wsgi.py) keeps them in memory.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return _MultiprocessMetrics
    return PrometheusMetrics


api = GatewayApi()
db = SQLAlchemy(model_class=Base)
migrate = Migrate()
jwt = JWTManager()
limiter = Limiter(key_func=lambda: "global", default_limits=[])
metrics = _metrics_class().for_app_factory(
    path="/metrics",
    group_by="url_rule",
    excluded_paths=["^/metrics$"],
    default_latency_as_histogram=True,
)
redis_store = RedisClient()
